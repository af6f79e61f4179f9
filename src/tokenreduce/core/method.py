"""The method contracts of every stage. A method plans `Reduction`s (or scores entries); the runtime applies them.

An encoder method is called once per block between attention and MLP (the place ToMe
reduces) with the block's hidden states, the running `TokenState` and the attention
signals it asked for, and returns a `Reduction` or None. A method may instead (or also)
reduce a block's input before its attention (`reduce_before_attention`, MCTF's
one-step-ahead fusion), probing that block's attention first and optionally fixing the
attention the block then uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from .budget import KeepCount, KeepRatio
from .errors import BudgetError
from .registry import MethodInfo
from .tokens import TokenState


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder method may know about the model it is attached to."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_prefix: int  # protected leading tokens ([CLS], DeiT's distillation token); 0 for SigLIP
    mlp_size: int
    patch_grid: tuple[int, int] | None = None  # set per forward for the patch tokens (rows, cols)

    @property
    def has_cls(self) -> bool:
        return self.num_prefix > 0


class Signal(str, Enum):
    """An attention signal a method requests in its ``signals``; the runtime computes only what is requested,
    from Q, K and V (`scoring.attention`), and never switches the model to eager attention."""

    KEYS = "keys"  # encoder: a block's keys [B, H, N, D]; kv-cache: the cached keys
    QUERIES = "queries"  # encoder: a block's queries [B, H, N, D]
    VALUES = "values"  # encoder: a block's values [B, H, N, D] (as the attention function receives them)
    SCALE = "scale"  # encoder: the attention scale
    CLS_ATTN = "cls_attn"  # encoder: the [CLS] softmax row [B, H, N]
    ATTN = "attn"  # encoder: the whole softmax map [B, H, N, N]
    WINDOW_ATTN = "window_attn"  # kv-cache: softmax rows of the last ``query_rows(n)`` queries (``KVContext.window``)
    LAST_QUERY_ATTN = "last_query_attn"  # kv-cache: the same, one row
    ACCUMULATED_ATTN = "accumulated_attn"  # kv-cache: every query row's ``row_weights`` summed (``KVContext.accumulated``)
    LAST_QUERY_LOGITS = "last_query_logits"  # decoder: the last query's raw logits at the filter layer
    CODES = "codes"  # kv-cache retrieval: approximate scores from quantised keys


def check_signals(cls) -> None:
    """Refuse a method class whose ``signals`` name no known `Signal` (a typo would silently compute nothing)."""
    known = {s.value for s in Signal}
    unknown = [s for s in getattr(cls, "signals", ()) if s not in known]
    if unknown:
        raise TypeError(f"{cls.__name__}.signals has unknown entries {unknown}; known: {sorted(known)}")


class Method:
    """Base of every method. Subclasses set the class metadata and implement their stage's hooks."""

    name: ClassVar[str]
    stage: ClassVar[str]
    paper: ClassVar[str]
    arxiv: ClassVar[str | None] = None
    training_free: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    signals: ClassVar[tuple[str, ...]] = ()  # the `Signal` values this method reads

    def __init__(self, keep_ratio: float | None = None):
        from .budget import check_keep_ratio

        keep_ratio = check_keep_ratio(getattr(self, "name", type(self).__name__), keep_ratio)
        self.budget = KeepRatio(keep_ratio) if keep_ratio is not None else None

    @classmethod
    def info(cls) -> MethodInfo:
        from .registry import method_params

        params = [(n, d) for n, d in method_params(cls) if n != "keep_ratio"]
        return MethodInfo(cls.name, cls.stage, cls.paper, cls.arxiv, cls.training_free, cls.needs_calibration,
                          tuple(cls.signals), tuple(n for n, _ in params), tuple(params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        return f"keep_ratio={self.budget.ratio}" if self.budget else ""

    @property
    def reduces_nothing(self) -> bool:
        """keep_ratio=1.0: by contract the method fires and reduces nothing, whatever its native schedule."""
        return self.budget is not None and self.budget.ratio == 1.0

    @classmethod
    def tokens_left_budget(cls, left: int, patches: int) -> dict | None:
        """For a method that reduces in a VLM's vision tower: the keyword arguments (its native budget) that leave
        ``left`` of an image's ``patches`` patch tokens for the language model (on average, for a calibrated one);
        None if it has no such budget. `bench vlm` runs the tower methods that have one at its budgets."""
        return None


class EncoderMethod(Method):
    stage: ClassVar[str] = "encoder"
    prop_attn: bool = False  # add log(token size) to attention logits in every block
    needs_cls: ClassVar[bool] = False
    runs_alone: ClassVar[bool] = False  # fixes a block's attention (an override): the only encoder method in its tower
    needs_grid: ClassVar[bool] = False  # needs the intact patch grid: reduces before every other method

    def check(self, info: EncoderInfo) -> None:
        """Raise `StageError` if this method cannot serve the model described by ``info``."""
        from .errors import StageError

        if self.needs_cls and not info.has_cls:
            raise StageError(f"{self.name} scores tokens by [CLS] attention, but {info.family} has no [CLS] "
                             "token; use a method that does not need one (tome, dymu, random, pool)")

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        """Called at the start of every forward with the number of input tokens."""

    def wants_signals(self, layer: int) -> bool:
        """Whether this method will reduce at ``layer`` (attention signals are computed only then)."""
        return True

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> "Reduction | None":  # noqa: F821
        raise NotImplementedError

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        """Analytic FLOPs of this method's scoring at one block (batch of one)."""
        return 0.0

    # -------------------------------------------------------- before attention (optional)
    def reduces_before_attention(self, layer: int) -> bool:
        """Whether `reduce_before_attention` runs at ``layer`` (never, unless a method says so)."""
        return False

    def reduce_before_attention(self, layer: int, x: Tensor, tokens: TokenState, probe) -> tuple:
        """Reduce the input ``x`` [B, N, C] of block ``layer`` (the residual stream) before its attention.

        ``probe(names=None)`` returns this block's attention signals on the N current tokens
        (names as in ``signals``; default: the method's ``signals``), computed by the block's own
        attention module with the block's key bias; call it only if needed — its cost (the
        module's Q/K/V projections and Q K^T) is added to ``stats.scoring_flops`` by the attachment.

        Returns ``(reduction, override)``: a `Reduction` of the N tokens (or None) and, optionally,
        attention probabilities [B, H, M, M] over the M reduced tokens. With an override the block's
        attention outputs ``override @ V`` (V projected from the reduced tokens; no softmax, no key
        bias, no dropout) instead of computing softmax(Q K^T) V.
        """
        raise NotImplementedError

    def scoring_flops_before_attention(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        """FLOPs of `reduce_before_attention`'s own planning at ``layer`` (N = ``num_tokens``), probe excluded."""
        return 0.0

    # -------------------------------------------------------- calibration (``needs_calibration``; optional)
    # `tokenreduce.calibrate(method, model, batches)` attaches the method, runs every batch and reports each forward
    def begin_calibration(self) -> None:
        raise NotImplementedError(f"{self.name} needs no calibration")

    def observe_forward(self, stats, items: int) -> None:
        """One calibration forward: its `Stats` and the number of images it ran."""

    def end_calibration(self, completed: bool) -> None:
        """After the last batch (``completed``) or an error (not completed): fit, or drop what was gathered."""


def generator_for(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------- kv-cache stage
@dataclass(frozen=True)
class DecoderInfo:
    """What a kv-cache method may know about the causal LM it is attached to."""

    family: str
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    compressible: tuple[int, ...]  # full-attention layers; sliding-window layers are left alone

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class KVContext:
    """One layer's cache at the end of prefill, as a kv-cache method scores it.

    Batches are left-padded; ``valid`` marks real entries and ``rank`` numbers them within
    their sample (0 = the sample's first real token), so a method scores every sample as
    if it were alone.
    """

    layer: int
    keys: Tensor  # [B, H_kv, N, D], rotated (post-RoPE), as cached
    values: Tensor  # [B, H_kv, N, D]
    valid: Tensor  # [B, N] bool
    rank: Tensor  # [B, N] long, -1 for padding
    lengths: Tensor  # [B] real entries
    budgets: Tensor  # [B] entries to keep
    window: Tensor | None  # [B, H, W, N] float32 softmax rows of the last W queries (W = max over query_rows)
    window_rows: Tensor | None  # [B] rows of ``window`` that belong to each sample (its last ones)
    info: DecoderInfo
    accumulated: Tensor | None = None  # [B, H, N] float32: every real query row's `row_weights` summed (H2O, Keyformer)


@dataclass
class EvictionContext:
    """One layer's cache during decoding, after a step appended its entries (decode-time eviction).

    Slots are physical (``P`` = the budget's slots + the new entries), in ascending logical
    position; ``age`` 0 is the newest entry.
    """

    layer: int
    state: Tensor  # [B, H, P] float32 accumulated score per query head (the method's `row_weights` summed)
    age: Tensor  # [B, H_kv, P] long: logical_length - 1 - position; huge for a padded slot
    valid: Tensor  # [B, P] bool
    budgets: Tensor  # [B] entries each sample keeps
    step: int  # decoding forwards so far, this one included (1 = the first after prefill)
    info: DecoderInfo


class CountedMethod(Method):
    """A method whose budget counts items per sample: ``keep_ratio`` of each sample's real items
    (``floor``, at least 1) or ``keep_count`` items. Subclasses name the items for messages."""

    whole: ClassVar[str] = "context"  # what the items make up
    items: ClassVar[str] = "cached entries"
    example_ratio: ClassVar[float] = 0.25

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None):
        from .budget import check_keep_count, check_keep_ratio

        keep_ratio = check_keep_ratio(self.name, keep_ratio)  # types and ranges first, then the combination
        keep_count = check_keep_count(self.name, keep_count)
        if (keep_ratio is None) == (keep_count is None):
            raise BudgetError(f"{self.name} needs exactly one budget: keep_ratio (fraction of the {self.whole}'s "
                              f"{self.items} kept, e.g. get_method('{self.name}', keep_ratio={self.example_ratio})) or "
                              f"keep_count ({self.items} kept per sample)")
        super().__init__(keep_ratio)
        self.count = KeepCount(keep_count) if keep_count is not None else None

    def describe(self) -> str:
        return f"keep_ratio={self.budget.ratio}" if self.budget else f"keep_count={self.count.count}"

    def budgets(self, lengths: Tensor) -> Tensor:
        """Items kept per sample [B] for samples of ``lengths`` [B] real items."""
        from .budget import check_nonempty

        check_nonempty(lengths, self.name)
        n = lengths.to(torch.long)
        if self.count is not None:
            if bool((n < self.count.count).any()):
                raise BudgetError(f"{self.name}: keep_count={self.count.count} is larger than the {self.whole} "
                                  f"({int(n.min())} {self.items} in the shortest sample); use a smaller keep_count or "
                                  "keep_ratio")
            return torch.full_like(n, self.count.count)
        m = torch.floor(n.to(torch.float64) * self.budget.ratio + 1e-9).to(torch.long)
        if bool((m < 1).any()):
            raise BudgetError(f"{self.name}: keep_ratio={self.budget.ratio} keeps less than 1 of the {int(n.min())} "
                              f"{self.items} of the shortest sample; raise keep_ratio or use keep_count=1 or more")
        return m


class KVMethod(CountedMethod):
    """A method that evicts KV-cache entries once, after the context is encoded (prefill).

    Budget (one meaning for every kv method): ``keep_ratio`` = fraction of the context's
    cache entries kept per sample, per layer and per KV head (``floor``, as kvpress's
    ``int(n * (1 - compression_ratio))``; kvpress ``compression_ratio = 1 - keep_ratio``), or
    ``keep_count`` = entries kept. A method only scores (`score`); the attachment selects the
    top entries, shrinks the cache and keeps positions right.
    """

    stage: ClassVar[str] = "kv-cache"
    evicts_during_decode: ClassVar[bool] = False  # keeps the cache at its budget while generating (`evict_score`)
    repositions: ClassVar[bool] = False  # kept entries take positions 0..M-1 in the cache (StreamingLLM's rolling cache)

    @property
    def accumulates(self) -> bool:
        """Whether the method reads every prefill query row's attention (`Signal.ACCUMULATED_ATTN`)."""
        return Signal.ACCUMULATED_ATTN in self.signals

    def check(self, info: DecoderInfo) -> None:
        """Raise `StageError` if this method cannot serve the model described by ``info``."""

    def compresses(self, layer: int) -> bool:
        """Whether this method compresses ``layer`` (all full-attention layers unless a method says otherwise)."""
        return True

    def query_rows(self, length: int) -> int:
        """Attention rows of the last queries this method needs for a context of ``length`` entries (0 = none)."""
        return 0

    def budgets(self, lengths: Tensor) -> Tensor:
        """As `CountedMethod.budgets`, except that an evicting method's ``keep_count`` is the cache's fixed size,
        which a shorter prompt may not reach yet (the cache fills up to it while decoding)."""
        if self.evicts_during_decode and self.count is not None:
            from .budget import check_nonempty

            check_nonempty(lengths, self.name)
            return torch.full_like(lengths.to(torch.long), self.count.count)
        return super().budgets(lengths)

    def score(self, ctx: KVContext) -> Tensor:
        """Scores ``[B, H_kv or 1, N]``: higher is kept; ``+inf`` forces an entry in."""
        raise NotImplementedError

    def layer_budgets(self, lengths: Tensor, layer: int, info: DecoderInfo) -> Tensor:
        """Entries kept per sample at ``layer`` (the same at every layer unless a method, e.g. PyramidKV, says so)."""
        return self.budgets(lengths)

    def begin_prefill(self) -> None:
        """Called once per compressed prefill, before its first layer (e.g. to reseed a noise generator)."""

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        """FLOPs of scoring one layer (batch of one), beyond the model's own prefill."""
        return 0.0

    # ------------------------------------------------ accumulated attention / decode-time eviction (optional)
    def row_weights(self, logits: Tensor, step: int) -> Tensor:
        """What one query row contributes to ``accumulated``, from its masked logits ``[B, H, r, K]`` (float32,
        ``-inf`` masked). ``step`` 0 is the prefill, ``t`` the t-th decoding forward. Default: softmax."""
        return logits.softmax(-1)

    def accumulation_key(self) -> tuple:
        """Methods with equal keys accumulate the same prefill attention (one computation serves them all)."""
        return (type(self).row_weights,)

    def evict_score(self, ctx: EvictionContext) -> Tensor:
        """Scores ``[B, H_kv or 1, P]`` of the slots after a decoding step; the top ``budgets`` stay."""
        raise NotImplementedError

    def cache_positions(self, real: Tensor) -> Tensor:
        """(``repositions`` methods) The position each slot takes inside the cache ``[B, H_kv, P]``, given which slots
        are real ``[B, H_kv, P]`` (slots in text order); the runtime re-rotates the keys that move."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- decoder stage (prompt filtering)
class PrefillFilterMethod(CountedMethod):
    """A decoder-stage method that filters the prompt once, in an early layer, before prefill.

    Budget (one meaning): ``keep_ratio`` = fraction of each sample's real prompt tokens kept
    (``floor``, at least 1), or ``keep_count`` = tokens kept per sample. The method scores
    (`score`) and says where (`filter_layer`); the attachment selects, re-prefills and keeps
    positions and masks right.
    """

    stage = "decoder"
    whole, items, example_ratio = "prompt", "tokens", 0.125

    def filter_layer(self, info: DecoderInfo, config) -> int:
        """The decoder layer (0-based) whose attention scores the prompt."""
        raise NotImplementedError

    def score(self, query: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
        """Scores [B, N] (higher kept) from the last query ``query`` [B, H, D] and ``keys`` [B, H_kv, N, D]
        (post-RoPE, layer ``L``); ``valid`` [B, N] marks real tokens (padding's score is ignored)."""
        raise NotImplementedError

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        """FLOPs of scoring (batch of one) beyond the projections the model computes anyway."""
        return 0.0


# ---------------------------------------------------------------------------- kv-cache stage, decode-time retrieval
class RetrievalMethod(KVMethod):
    """A kv-cache method that never evicts: the whole cache stays, and each decoding step attends exactly to a
    subset of it that the method retrieves from a cheap approximate score (A²ATS).

    The runtime (`runtime.kv_retrieval`) hands the method pre-RoPE keys as they enter the cache
    (`encode`) and, at each decoding step, the query rotated to ``relative_position``; the
    method returns the entries to attend (`decode_selection`). ``check(info, full)`` raises
    `CalibrationError` before any work when the method is not calibrated; calibration data comes
    from `tokenreduce.calibrate` through `observe` and `fit`.
    """

    relative_position: int = 0

    def check(self, info: DecoderInfo, full: tuple[int, ...] | None = None) -> None:
        """Raise before any work if this method cannot serve ``info`` (e.g. not calibrated for it)."""

    def encode(self, k: int, keys_pre: Tensor) -> Tensor:
        """Codes ``[B, H_kv, q]`` of the new pre-RoPE keys of the ``k``-th full-attention layer."""
        raise NotImplementedError

    def decode_selection(self, k: int, query_w: Tensor, codes: Tensor, valid: Tensor, scaling: float):
        """``(selected [B, H_kv, K] bool, scores, picked)`` for one decoding query at layer ``k``."""
        raise NotImplementedError

    def device_tensors(self) -> dict[str, Tensor]:
        """Tensors the method keeps on the accelerator (codebooks …), for the placement figures."""
        return {}

    # calibration (driven by `tokenreduce.calibrate`)
    def begin_calibration(self) -> None:
        """Called once before the first calibration forward."""

    def observe(self, k: int, keys_pre: Tensor, query_w: Tensor) -> None:
        """One forward's new pre-RoPE keys [B, H_kv, q, D] and queries at ``relative_position`` [B, H, q, D]."""
        raise NotImplementedError

    def fit(self, info: DecoderInfo, full: tuple[int, ...], tokens: int, **options) -> None:
        """Fit the method's state from everything observed (``tokens`` token positions in all)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- visual tokens of a VLM
@dataclass
class VisualContext:
    """One image's (or video's) visual tokens where they enter the language model (the connector).

    ``features`` are the language model's input embeddings at the image's placeholders, in the
    prompt's order. The tower's signals are the select layer's (the layer whose output the
    projector reads), for the visual tokens only, when the tower has a [CLS] token.
    """

    features: Tensor  # [n, D]
    budget: int  # tokens to keep
    cls_attention: Tensor | None = None  # [H, n] the tower's [CLS] softmax row to each visual token
    tower_keys: Tensor | None = None  # [H, n, Dh] the tower's keys of the visual tokens
    grid: tuple[int, int] | None = None  # (rows, cols) when the tokens are one raster grid
    generator: torch.Generator | None = None
    tower_attention: Tensor | None = None  # [H, N, N] the select layer's softmax map: prefix tokens, then these n


class ConnectorMethod(CountedMethod):
    """A method that keeps or merges visual tokens after they enter the language model's input embeddings.

    Budget (one meaning): ``keep_ratio`` = fraction of each image's visual tokens kept (``floor``,
    at least 1), or ``keep_count`` = visual tokens kept per image. The method plans one `Reduction`
    per image (`plan`); the attachment rewrites embeddings, positions, masks and caches. Kept and
    merged tokens keep their original positions (a merged token its earliest source's) unless the
    method renumbers (``renumber=True``: end-aligned, as GemFilter, so ``generate`` continues right).
    """

    stage = "connector"
    whole, items, example_ratio = "image", "visual tokens", 0.25
    needs_cls: ClassVar[bool] = False  # reads the tower's [CLS] attention (FasterVLM, VisionZip)
    needs_grid: ClassVar[bool] = False  # reads the raster grid (pooling)
    needs_attention_map: ClassVar[bool] = False  # reads the select layer's whole attention map (VFlowOpt)
    gives_prior: ClassVar[bool] = False  # scores its output tokens (`prior`) for an in-LLM method that asks
    renumber: bool = False

    def plan(self, ctx: VisualContext) -> "Reduction":  # noqa: F821
        """A Reduction of batch 1 from the image's ``n`` tokens to at most ``ctx.budget`` tokens."""
        raise NotImplementedError

    def prior(self, ctx: VisualContext, plan: "Reduction") -> Tensor:  # noqa: F821
        """(``gives_prior`` methods) A score of each of ``plan``'s output tokens [plan.num_out], float, higher = more
        important: handed to an in-LLM method after this one that asks (``LayerDropMethod.needs_prior``,
        `LayerContext.prior`), which may rank the tokens by it at its drop layers (VFlowOpt's tower map)."""
        raise NotImplementedError

    def scoring_flops(self, n: int, ctx: VisualContext) -> float:
        """FLOPs of planning beyond what the model computes anyway."""
        return 0.0


@dataclass(frozen=True)
class ImageTiles:
    """How one image's visual tokens tile it, when the model shows a big image as a base view plus crops
    (LLaVA-NeXT's AnyRes): the base (coarse) view's tokens first, a ``side x side`` raster of the whole image,
    then the crops' tokens packed as one raster of the image (unpadded, rows across crops, a layout token
    such as a newline ending each row).

    ``part`` [tokens] long: 0 = a base-view token, k >= 1 = a token of crop k (row-major over ``grid``),
    -1 = a layout token; ``raster`` [H, W] long: the image's token index at each position of the crops'
    raster (which covers the whole image, as the base view does).
    """

    part: Tensor
    side: int
    grid: tuple[int, int]
    raster: Tensor


@dataclass
class LayerContext:
    """One sample's tokens where a drop layer of the language model starts, as an in-LLM method plans them.

    Rows are the tokens still present (padding excluded), in prompt order. ``attention`` holds softmax
    rows over them (GQA-correct, causal): the last prompt token's row alone (``attention_rows = "last"``),
    every row (``"all"``), or nothing (``"none"``).
    """

    layer: int
    hidden: Tensor  # [n, D] the hidden states entering layer ``layer``
    visual: Tensor  # [n] bool: which rows are visual tokens
    attention: Tensor | None  # [H, r, n] float32: r = 1 (the last row) or n
    budget: int  # visual tokens to keep: the schedule's count of the original visual tokens
    inputs: Tensor  # [n, D] the same tokens' input embeddings (what entered the language model)
    visual_inputs: Tensor  # [N, D] the input embeddings of every visual token the sample's prompt had
    keys: Tensor | None  # [H_kv, n, Dh] the post-RoPE keys the attention rows were computed from
    rotary: tuple  # (cos, sin) [..., n, Dh]: the rotary embeddings of the rows' positions
    values: Tensor | None = None  # [H_kv, n, Dh] the value vectors, when the method asks (``needs_values``)
    # [n] float: the connector method's score of each row (`ConnectorMethod.prior`), when the method asks
    # (``needs_prior``); NaN at text rows. A row an earlier drop merged keeps the prior of the row whose place it took
    prior: Tensor | None = None
    # the sample's images as base view + crops (`ImageTiles`, in prompt order), when the method asks (``needs_tiles``),
    # the model packs its images that way (LLaVA-NeXT) and every visual token is still present; else None
    tiles: list | None = None


class LayerDropMethod(Method):
    """A method that reduces visual tokens inside the language model during the prefill (FastV, PyramidDrop,
    SparseVLM, VisionDrop, LLaVolta).

    It names a schedule: at each drop layer ``K`` (0-based), the visual tokens still there are reduced
    to the schedule's ``fraction`` of the *original* visual count. By default the top ones by a score
    of the last prompt token's attention are kept (`plan`, `score`); a method may instead plan any
    `Reduction` of a sample's visual tokens (merge, pool, recycle): each output token takes the place
    and position of its earliest source. The attachment computes the attention rows the method asks
    for (``attention_rows``) from Q and K only (SDPA stays SDPA): from the previous layer's attention
    call (``scores_from = "previous"``, FastV) or from layer ``K``'s own norm and projections applied
    to its input (``"own"``, PyramidDrop). Layers >= ``K`` then run on the kept tokens only, their
    cache holds only them, and ``generate`` continues.

    Budget (one meaning): ``keep_ratio`` = the fraction of visual tokens kept, averaged over the
    language model's layers; each method solves its native schedule for it. Or ``schedule``: any
    per-layer schedule (a `core.schedule.LayerSchedule`, a list of ``(layer, fraction)`` pairs, or the
    path of a saved one, e.g. from ``tokenreduce search-schedule``) replaces the method's native
    schedule, its scoring unchanged; it excludes ``keep_ratio`` and the native budget parameters.
    """

    stage = "decoder"
    scores_from: ClassVar[str] = "previous"
    attention_rows: ClassVar[str] = "last"  # "last" (the last prompt token's row), "all", or "none"
    needs_values: ClassVar[bool] = False  # hand the drop layer's value vectors to `plan` (LayerContext.values)
    # hand the connector method's score of each row to `plan` (LayerContext.prior): refused at attach unless a connector
    # method that gives one (``ConnectorMethod.gives_prior``, e.g. vflowopt) runs before it
    needs_prior: ClassVar[bool] = False
    needs_tiles: ClassVar[bool] = False  # hand a base-view + crops image layout to `plan` (LayerContext.tiles)
    runs_schedules: ClassVar[bool] = True  # takes any per-layer ``schedule`` (False: YOPO, which ranks no tokens)

    def __init__(self, keep_ratio: float | None = None, schedule=None):
        super().__init__(keep_ratio)
        from .schedule import as_schedule

        self.given_schedule = None if schedule is None else as_schedule(schedule, f"{self.name}: schedule")
        if self.given_schedule is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or schedule, not both (a schedule fixes the tokens kept "
                              "at every layer)")
        if self.given_schedule is not None and not self.given_schedule.drops:
            raise BudgetError(f"{self.name}: the schedule drops no visual token (it has no drop layer); run the model "
                              "without the method, or pass a schedule with at least one (layer, fraction) pair")

    def one_drop_budget(self, k: int | None, r: float | None, why_k: str) -> None:
        """FastV's native budget, shared by methods that drop once: ``self.k`` (default 2) and ``self.r`` (the fraction
        dropped at ``k``; default 0.5 when neither ``keep_ratio`` nor a schedule is given), checked."""
        from .params import check_float, check_int

        self.refuse_with_schedule(k=k, r=r)
        self.k = check_int(self.name, "k", 2 if k is None else k, min=1, why=why_k)
        self.r = check_float(self.name, "r", r, min=0.0, max=1.0, max_open=True, optional=True,
                             why="the fraction of visual tokens dropped at layer k")
        if self.r is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or r, not both")
        if self.r is None and self.budget is None and self.given_schedule is None:
            self.r = 0.5

    def refuse_with_schedule(self, **native) -> None:
        """Raise `BudgetError` if a native budget parameter was given (not None) together with ``schedule``."""
        given = [name for name, value in native.items() if value is not None]
        if self.given_schedule is not None and given:
            raise BudgetError(f"{self.name}: give {given[0]} or schedule, not both (the schedule fixes the drop layers "
                              "and the tokens kept at each)")

    def describe(self) -> str:
        return self.given_schedule.describe() if self.given_schedule is not None else super().describe()

    def schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        """[(layer K, fraction of the original visual tokens kept from K on)], K ascending, fractions falling: the
        given ``schedule`` (checked against the model's layers), else the method's `native_schedule`."""
        if self.given_schedule is not None:
            return self.given_schedule.check(info.num_layers, f"{self.name}: schedule").pairs()
        return self.native_schedule(info)

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        """The method's own schedule from its native parameters or ``keep_ratio``."""
        raise NotImplementedError

    def plan(self, ctx: LayerContext) -> "Reduction":  # noqa: F821
        """A Reduction of batch 1 from the sample's ``v`` visual tokens (in prompt order) to at most ``v`` tokens.
        Default: keep the top ``ctx.budget`` by `score` of the last row (ties: the earlier token)."""
        from .reduction import Reduction

        score = self.score(ctx.attention[None, :, -1]).float()[0][ctx.visual]
        keep = score.sort(descending=True, stable=True).indices[: ctx.budget].sort().values
        return Reduction.keep(keep[None], score.numel())

    def place(self, plan: "Reduction") -> Tensor:  # noqa: F821
        """The source whose place (row and position) each output token of ``plan`` takes [M]; one of its own
        sources. Default: the earliest."""
        return plan.anchors()[0]

    def score(self, attention: Tensor) -> Tensor:
        """Scores [B, L] (higher kept; only visual tokens are ranked) from the last query's softmax ``attention``
        [B, H, L] over the tokens present at the drop layer."""
        return attention.mean(1)

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        """FLOPs of scoring at one drop layer over ``length`` tokens, beyond what the model computes anyway: the
        attention rows asked for (a method adds its own planning)."""
        rows = {"last": 1, "all": length, "none": 0}[self.attention_rows]
        return 2.0 * info.num_heads * rows * length * info.head_dim

    @staticmethod
    def mean_kept(schedule: list[tuple[int, float]], num_layers: int) -> float:
        """The fraction of visual tokens kept, averaged over the layers, of a schedule (`core.schedule.mean_kept`)."""
        from .schedule import mean_kept

        return mean_kept(schedule, num_layers)

    # attention edits on visual keys in the layers before the first drop (YOPO; `runtime.visual_heads`): they mask,
    # they save no work
    measures_visual_heads: bool = False  # while True: each layer's per-head share of the last prompt row's attention
    # on visual keys reaches `observe_forward`'s stats (``visual_head_ratio``), e.g. during `tokenreduce.calibrate`

    def visual_heads(self, layer: int, num_heads: int) -> Tensor | None:
        """[num_heads] bool: the query heads of ``layer`` that keep attending to visual keys; in the others the softmax
        weights on visual keys are set to 0 (not renormalised), prefill and decoding. None (default): all heads."""
        return None

    def visual_window(self) -> int | None:
        """An odd window ``w``: in the prefill a visual query sees, of the visual keys, only its image's within
        ``w x w`` grid cells (and earlier, causal). None (default): no edit."""
        return None


# ---------------------------------------------------------------------------- decoder stage (virtual unmerging)
class UnmergeMethod(Method):
    """A decoder-stage method that runs the language model's attention on merged visual tokens *unmerged*
    (DyMU's VTU): every row the connector hands over stands for the prompt positions its tokens came from; the
    attention sees one copy per position (at that position's RoPE) and each row takes the mean of its copies'
    outputs, while every linear layer and MLP runs on the merged rows (`runtime.unmerge`).

    ``tower``: an encoder method the method brings along (the whole pipeline in one method; attached in the
    vision tower by `apply`), or None: it unmerges what the tower methods of the same `apply` merged.
    """

    stage = "decoder"
    tower: "EncoderMethod | None" = None
