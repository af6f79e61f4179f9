"""In-LLM stage: reduce visual tokens inside a VLM's language model during the prefill (FastV, PyramidDrop,
SparseVLM, VisionDrop, LLaVolta).

A `LayerDropMethod` names a schedule of drop layers ``K``. During a prefill whose prompt carries
visual tokens (found from the input ids and the model's placeholder ids, captured by a pre-hook
on the VLM's inner model), at each ``K`` the method plans, per sample, a `Reduction` of the visual
tokens still present (by default: keep the top ones by the last prompt token's attention), and
from layer ``K`` on the hidden states hold only the text tokens and the reduced visual ones, each
at its earliest source's place and position:

* attention rows come from Q and K only — the previous layer's own attention call (a routed
  listener computes the softmax rows the method asks for, the last query's or all of them; SDPA
  stays SDPA), or layer ``K``'s norm, Q/K projections and RoPE applied to its input (PyramidDrop's
  reference), GQA-correct;
* a forward pre-hook on each layer ``>= K`` gives it the pruned hidden states' own mask
  (causal over the kept tokens, padding masked; a padded slot sees only itself), positions and
  rotary embeddings: kept tokens keep their original positions; no layer runs twice;
* those layers' cache holds only the kept entries; after the prefill they become
  `core.kv.CompressedLayer` s of the prompt's logical length, so ``generate`` continues, and at
  each decoding step a listener gives every compressed layer its own mask.

The language model's output covers the kept tokens only (``logits`` has the pruned length; the
last position is still the prompt's last token, which ``generate`` reads). Samples of a batch
keep their own counts and are left-padded. Models with sliding-window layers are refused.

A method that ranks by the connector method's score of each token (``needs_prior``: VFlowOpt's language-model
drops by its tower map) follows a connector method that gives one (``ConnectorMethod.gives_prior``; refused at
attach otherwise): the connector hands the scores over with its rewritten rows, they follow the rows through every
drop, and each plan receives its rows' (`LayerContext.prior`).

A schedule fraction of exactly 0 deletes every visual token from that layer on (YOPO's layer skipping;
the method is not asked to plan). A method may also edit attention on visual keys in the layers before
its first drop (inactive visual heads, neighbour windows; `runtime.visual_heads`), with or without a
drop.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.kv import CompressedLayer, gather_mask, kv_bytes, layer_mask
from ..core.method import LayerContext, LayerDropMethod
from ..core.schedule import kept_count
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, attention_modules, decoder_info, layer_types
from ..families.vlms import VLMParts
from ..scoring.attention import row_logits
from ..scoring.rope import rotate
from .kv_cache import mark_uniform
from .prefill_filter import decoder_layer_flops
from .routing import call_arguments, check_implementation, route
from .visual_heads import VisualAttentionEdits
from .vlm_inputs import VisualInputs


@dataclass
class InLLMStats(Stats):
    """`Stats` plus the visual tokens each layer processed (means over the batch's samples)."""

    visual_tokens: float = 0.0
    visual_tokens_per_layer: list[float] = field(default_factory=list)
    prompt_tokens: float = 0.0
    no_visual_forwards: int = 0  # prompts without a visual token (text only): passed unchanged
    kept_positions: dict = field(default_factory=dict)  # drop layer -> per sample, prompt positions kept from it on
    # attention edits on visual keys (`runtime.visual_heads`): masked only, so these FLOPs are *not* saved here, and
    # while the method measures, layer -> [B, H] the last prompt row's visual / other attention mass per head
    masked_attention_flops: float = 0.0
    visual_head_ratio: dict = field(default_factory=dict)

    @property
    def kept_visual_fraction(self) -> float:
        """Visual tokens kept, averaged over the layers, as a fraction of the prompt's (``keep_ratio``'s meaning)."""
        if not self.visual_tokens or not self.visual_tokens_per_layer:
            return 1.0
        return sum(self.visual_tokens_per_layer) / len(self.visual_tokens_per_layer) / self.visual_tokens

    def as_dict(self) -> dict:
        return {**super().as_dict(), "visual_tokens": self.visual_tokens, "prompt_tokens": self.prompt_tokens,
                "visual_tokens_per_layer": self.visual_tokens_per_layer,
                "kept_visual_fraction": self.kept_visual_fraction}


@dataclass
class _Run:
    """The running prefill's token layout: which prompt token each row holds, from the current layer on."""

    index: Tensor  # [B, L] prompt position of each row, -1 = padded slot
    visual: Tensor  # [B, L] bool
    positions: Tensor  # [B, L] or [k, B, L]
    embeddings: tuple  # (cos, sin) as the layers receive them
    mask: object  # what the layers receive as attention_mask (the original, until the first drop)
    length: int  # the prompt's (logical) length
    visual_counts: Tensor  # [B] visual tokens of each sample at the start
    dropped: bool = False
    inputs: Tensor | None = None  # [B, N, D] the prompt's input embeddings
    visual0: Tensor | None = None  # [B, N] bool: the prompt's visual tokens
    scores: Tensor | None = None  # [B, H, r, L] softmax attention rows (r = 1: the last query's), for the next drop
    keys: Tensor | None = None  # [B, H_kv, L, Dh] the post-RoPE keys the rows came from
    values: Tensor | None = None  # [B, H_kv, L, Dh] the same layer's values (methods that ask: ``needs_values``)
    prior: Tensor | None = None  # [B, L] float: the connector method's score of each row (``needs_prior``; NaN: text)
    tiles: list | None = None  # per sample, its images' `ImageTiles` (``needs_tiles`` on an AnyRes model), or None
    tokens_per_layer: list[float] = field(default_factory=list)
    visual_per_layer: list[float] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    cache: Cache | None = None
    index_at: dict = field(default_factory=dict)  # layer -> the index its cache entries come from
    kept_at: dict = field(default_factory=dict)  # drop layer -> per sample, the prompt positions kept

    @property
    def valid(self) -> Tensor:
        return self.index >= 0


def _row(t: Tensor, s: int, rows: Tensor) -> Tensor:
    """Sample ``s``'s ``rows`` of a rotary table [..., B or 1, L, D]."""
    t = t[..., min(s, t.shape[-3] - 1), :, :]
    return t[..., rows, :]


def _take(t: Tensor, idx: Tensor, dim_from_end: int) -> Tensor:
    """Gather ``t`` [..., B, L, (D)] along its sequence dim (``dim_from_end`` = 1 without a feature dim, 2 with)."""
    seq = t.dim() - dim_from_end
    b = idx.shape[0]
    shape = list(t.shape)
    shape[seq - 1] = b
    t = t.expand(*shape)
    view = [1] * t.dim()
    view[seq - 1], view[seq] = b, idx.shape[1]
    index = idx.clamp_min(0).reshape(view)
    full = list(t.shape)
    full[seq] = idx.shape[1]
    return t.gather(seq, index.expand(*full))


def schedule_prefill_flops(schedule, method: LayerDropMethod, info, mlp_size: int, length: float,
                           visual: int) -> tuple[float, float]:
    """Analytic ``(flops, flops_full)`` of the language model's prefill of one prompt of ``length`` tokens, ``visual``
    of them visual, under ``schedule`` ([(layer, fraction)]) and ``method``'s scoring: counted as `InLLMAttachment`
    counts a forward (each layer on its width, the scoring at each drop over the previous layer's width; kept
    counts ``floor(fraction * visual)``, at least 1; a fraction of exactly 0 keeps none). ``flops_full``: every layer on
    the whole prompt."""
    drops = dict(schedule)
    widths, kept = [], visual
    for i in range(info.num_layers):
        if i in drops:
            kept = 0 if drops[i] == 0 else kept_count(visual, drops[i])  # 0: every visual token deleted (YOPO)
        widths.append(length - visual + kept)
    flops = sum(decoder_layer_flops(w, info, mlp_size) for w in widths)
    flops += sum(method.scoring_flops(widths[k - 1], info) for k in drops)
    return flops, info.num_layers * decoder_layer_flops(length, info, mlp_size)


class InLLMAttachment:
    """One in-LLM visual-token method attached to one VLM's language model."""

    def __init__(self, model: nn.Module, parts: VLMParts, family: DecoderFamily, backbone: nn.Module,
                 method: LayerDropMethod, after=None):
        """``after``: the connector attachment that rewrites the prompt before this stage (a connector method or a
        tower reduction), whose rewritten rows this stage reduces further."""
        if backbone is not parts.language_model:
            raise UnsupportedModelError(f"{method.name}: the decoder found is not the VLM's language model")
        types = layer_types(backbone.config)
        if any(t != "full_attention" for t in types):
            raise UnsupportedModelError(f"{method.name} drops visual tokens in language models whose layers all use full "
                                        f"attention; this {family.name} model has {sorted(set(types))} layers")
        self.parts, self.method, self.backbone, self.family = parts, method, backbone, family
        self.impl = check_implementation(backbone.config, method.name)
        self.layers = list(family.layers(backbone))
        self.attns = attention_modules(family, backbone)
        self.info = decoder_info(family, backbone, tuple(range(len(self.layers))))
        self.mlp_size = backbone.config.intermediate_size
        self.schedule = method.schedule(self.info)
        nl = len(self.layers)
        for k, _ in self.schedule:
            if not 1 <= k < nl:
                raise StageError(f"{method!r}: drop layer {k} is outside this language model's layers 1..{nl - 1} "
                                 f"({nl} layers)")
        self.drops = dict(self.schedule)
        if method.attention_rows not in ("last", "all", "none"):
            raise StageError(f"{method.name}: attention_rows must be 'last', 'all' or 'none'; got {method.attention_rows!r}")
        self.scored = method.attention_rows != "none"
        if method.needs_prior and not (after is not None and after.method.gives_prior):
            from ..core.registry import registered

            givers = sorted(n for n, c in registered().items() if getattr(c, "gives_prior", False))
            example = givers[0] if givers else "<connector method>"
            raise StageError(f"{method.name} ranks the visual tokens by the connector method's score of each of "
                             f"them, and no connector method that scores its tokens runs before it"
                             f"{f' ({after.method.name} does not)' if after is not None else ''}; compose one "
                             f"(connector methods that do: {', '.join(givers) or 'none registered'}), e.g. "
                             f"tokenreduce.apply(model, get_method({example!r}, keep_ratio=...), "
                             f"get_method({method.name!r}))")
        if self.scored and method.scores_from == "own" and parts.family.positions != "1d":
            raise UnsupportedModelError(f"{method!r} scores with layer K's own projections and 1-D RoPE; this "
                                        f"{parts.family.name} model uses M-RoPE: pass scores_from='previous'")
        self.stats = InLLMStats()
        self._run: _Run | None = None
        self._padding: Tensor | None = None
        self._cache: Cache | None = None
        self._flagged: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        self._sig = inspect.signature(backbone.forward)
        self._undo = Undo()
        self.after = after
        self.edits: VisualAttentionEdits | None = None
        self._prompt_kept: Tensor | None = None
        try:
            self._attach()
        except Exception:
            self.remove()
            raise

    def _attach(self) -> None:
        first = self.schedule[0][0] if self.schedule else len(self.layers)  # no drop: attention edits alone (YOPO)
        for i, attn in enumerate(self.attns):
            if i >= first or (i + 1 in self.drops and self.method.scores_from == "previous") or self.after:
                route(attn, self, i, self._undo)  # after a connector: every layer's decoding mask
        for i, layer in enumerate(self.layers):
            if i >= first:
                self._undo.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True).remove)
        if self.parts.family.deepstack and hasattr(self.backbone, "_deepstack_process"):
            self._wrap_deepstack()
        self._attach_edits(first)
        self.inputs = VisualInputs(self.parts, self._undo)
        # the end hook runs before a connector's: this stage's pruned layers first, then the connector makes every
        # layer stand for the whole prompt
        self._undo += [self.backbone.register_forward_pre_hook(self._begin, with_kwargs=True).remove,
                       self.backbone.register_forward_hook(self._end, with_kwargs=True, prepend=True).remove]
        if self.after is not None:
            self.after.lm_counted_later = True
            self._undo.append(lambda: setattr(self.after, "lm_counted_later", False))
            if self.method.needs_prior:  # the connector scores its rows only for a stage that reads them
                self.after.wants_prior = True
                self._undo.append(lambda: setattr(self.after, "wants_prior", False))

    def _attach_edits(self, first: int) -> None:
        """The method's attention edits on visual keys in the layers before the first drop, if it names any."""
        m, nh = self.method, self.info.num_heads
        heads = {i: h.to(torch.bool) for i in range(first) if (h := m.visual_heads(i, nh)) is not None}
        for i, h in heads.items():
            if h.shape != (nh,):
                raise StageError(f"{m.name}: visual_heads({i}) has shape {tuple(h.shape)}; expected ({nh},)")
        heads = {i: h for i, h in heads.items() if not bool(h.all())}
        window, measure = m.visual_window(), m.measures_visual_heads
        self.edits = None
        if m.reduces_nothing or not (heads or window is not None or measure):
            if not self.schedule and not m.reduces_nothing:
                raise StageError(f"{m!r} drops no visual token and edits no attention: nothing to do")
            return
        if self.after is not None:
            raise StageError(f"{m.name}: attention edits on visual keys cannot follow a connector or tower reduction "
                             "yet (the rewritten prompt's visual rows are not tracked while decoding)")
        self.edits = VisualAttentionEdits(m, heads, window, measure, list(range(first)), nh, self.info.head_dim,
                                          self.impl)
        for i in range(first):
            route(self.attns[i], self.edits, i, self._undo)

    def _wrap_deepstack(self) -> None:
        """Qwen3-VL adds early tower layers' features to the visual tokens after its first layers; once visual tokens
        are dropped, the positions and features it adds must follow the kept ones."""
        original = self.backbone._deepstack_process

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            run = self._run
            if run is None or not run.dropped or visual_pos_masks.shape[1] == hidden_states.shape[1]:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            full = visual_embeds.new_zeros(*visual_pos_masks.shape, visual_embeds.shape[-1])
            full[visual_pos_masks] = visual_embeds
            idx = run.index
            mask = torch.where(idx >= 0, _take(visual_pos_masks.long(), idx, 1), 0).bool()
            return original(hidden_states, mask, _take(full, idx, 2)[mask])

        self._undo.set_instance_attr(self.backbone, "_deepstack_process", deepstack_process)

    def _masks(self, layer) -> bool:
        """Whether this stage builds ``layer``'s decoding masks: the layers it pruned, and after a connector every
        layer the connector's rewrite compressed."""
        if not isinstance(layer, CompressedLayer):
            return False
        return getattr(layer, "dropped_by", None) is self or (
            self.after is not None and getattr(layer, "rewritten_by", None) is self.after)

    def remove(self) -> None:
        self._unflag()
        self._run = None
        self._undo.run()

    def _unflag(self) -> None:
        for layer in list(self._flagged):
            layer.masked_by = None
        self._flagged = weakref.WeakSet()

    # ------------------------------------------------------------------ backbone hooks
    def _begin(self, backbone, args, kwargs):
        self._unflag()
        self._run = None
        kw = call_arguments(self._sig, args, kwargs)
        ids = self.inputs.take_ids()
        mask = kw.get("attention_mask")
        if isinstance(mask, dict):  # Gemma 3: the VLM built its 4-D masks; the padding is its caller's 2-D mask
            mask = self.inputs.mask
        self._padding = mask.to(torch.bool) if isinstance(mask, Tensor) and mask.dim() == 2 else None
        cache = kw.get("past_key_values")
        self._cache = cache
        if isinstance(cache, Cache):
            for layer in cache.layers:
                if self._masks(layer):
                    layer.masked_by = self
                    self._flagged.add(layer)
        embeds = kw.get("inputs_embeds")
        if ids is None or embeds is None:
            return None
        if self.method.reduces_nothing:  # keep_ratio=1.0: fires, reduces nothing, the model's own path
            self.inputs.fired = True
            self.stats = InLLMStats(batch_size=ids.shape[0])
            return None
        if self.after is not None:  # the connector rewrote the prompt: reduce its rows
            rewritten, self.after.rewritten = self.after.rewritten, None
            if rewritten is None:
                return None  # a text-only prompt or a decoding step: the connector left the call as it was
            visual, self._prompt_kept = rewritten["visual"], rewritten["kept"]
            prior = rewritten.get("prior") if self.method.needs_prior else None
            self._padding = rewritten["kept"] >= 0
            mask = self._padding
        else:
            visual, prior = self.parts.visual_mask(ids), None
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if not bool(visual.any()):
            if not past and self.edits is not None:
                self.edits.prompt(None, None)
            if not past:  # a text-only prompt: nothing to drop (counted); decoding steps leave the stats alone
                self.stats = InLLMStats(batch_size=ids.shape[0], no_visual_forwards=self.stats.no_visual_forwards + 1)
            return None
        if past:
            if not self.inputs.images:  # a generated token that happens to be a placeholder id: text
                return None
            raise StageError(f"{self.method.name}: visual tokens in a forward that continues a cache holding {past} "
                             "tokens; prefill the image prompt in one forward")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            raise StageError(f"{self.method.name} needs the 2-D padding mask of the prompt (or none)")
        b, n = embeds.shape[:2]
        valid = self._padding if self._padding is not None else torch.ones(b, n, dtype=torch.bool, device=ids.device)
        visual = visual & valid
        if self.edits is not None:
            self.edits.prompt(visual, valid)
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(n, device=ids.device)[None]
        if self.method.needs_prior and (prior is None or prior.shape != (b, n)):
            raise StageError(f"{self.method.name}: the connector handed over no score of its {n} rows (prior); "
                             "nothing to rank the visual tokens by")
        self._run = _Run(index=torch.where(valid, torch.arange(n, device=ids.device)[None], -1), visual=visual,
                         positions=pos, embeddings=None, mask=None, length=n, visual_counts=visual.sum(-1),
                         cache=cache if isinstance(cache, Cache) else None, inputs=embeds,
                         visual0=visual, prior=prior, tiles=self._tiles(visual))
        self._budgets = {k: self._count(frac, self._run.visual_counts) for k, frac in self.schedule}
        self.inputs.fired = True
        return None

    def _tiles(self, visual: Tensor) -> list | None:
        """Per sample, its images' base-view + crops layouts (`families.vlms.anyres_tiles`), for a method that asks, on
        a model that packs images so, when the prompt's visual tokens are the images' own (no connector stage before);
        None when they cannot be matched (the method's own layout check then explains)."""
        sizes = self.inputs.take_image_sizes()
        if not (self.method.needs_tiles and self.parts.family.anyres and self.after is None and sizes is not None):
            return None
        from ..families.vlms import anyres_tiles

        images, out = anyres_tiles(self.parts.inner, sizes), []
        for count in visual.sum(-1).tolist():
            mine, total = [], 0
            while total < count and images:
                mine.append(images.pop(0))
                total += mine[-1].part.numel()
            if total != count:
                return None
            out.append(mine)
        return out if not images else None

    @staticmethod
    def _count(frac: float, counts: Tensor) -> Tensor:
        """Visual tokens each sample keeps: floor(frac * n), at least 1 (a text-only sample of the batch keeps 0);
        the tensor form of `core.schedule.kept_count`, which the analytic counts use. A fraction of exactly 0 (a
        method's native schedule only; saved schedules keep fractions in (0, 1]) keeps none: from that layer on the
        visual tokens are deleted (YOPO's layer skipping)."""
        if frac == 0:
            return torch.zeros_like(counts)
        kept = torch.floor(counts.to(torch.float64) * frac + 1e-9).to(torch.long).clamp_min(1)
        return torch.minimum(kept, counts)

    # ------------------------------------------------------------------ layers
    def _make_layer_hook(self, i: int):
        def hook(layer, args, kwargs):
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.embeddings is None:  # the first hooked layer: what every layer receives in this forward
                run.embeddings, run.mask = kwargs.get("position_embeddings"), kwargs.get("attention_mask")
            if i in self.drops:
                if self.scored and self.method.scores_from == "own":
                    run.scores = self._own_scores(i, layer, hidden, run)
                hidden = self._drop(i, hidden, run)
            self._record_layer(run)
            if not run.dropped:
                return None
            new = dict(kwargs)
            new["attention_mask"] = run.mask
            new["position_embeddings"] = run.embeddings
            new["position_ids"] = run.positions
            run.index_at[i] = run.index
            if args:
                return (hidden, *args[1:]), new
            new["hidden_states"] = hidden
            return args, new
        return hook

    def _record_layer(self, run: _Run) -> None:
        run.tokens_per_layer.append(float(run.valid.sum(-1).float().mean()))
        run.visual_per_layer.append(float((run.visual & run.valid).sum(-1).float().mean()))
        run.widths.append(run.index.shape[1])

    def _own_scores(self, i: int, layer: nn.Module, hidden: Tensor, run: _Run) -> Tensor:
        """PyramidDrop: layer i's norm, Q/K projections and RoPE on its input; the softmax rows asked for."""
        attn = self.attns[i]
        b, n, _ = hidden.shape
        hd = self.info.head_dim
        r = n if self.method.attention_rows == "all" else 1
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x[:, n - r:]).view(b, r, -1, hd)
        k = attn.k_proj(x).view(b, n, -1, hd)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = run.embeddings
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        q, k = rotate(q, cos[:, n - r:], sin[:, n - r:]), rotate(k, cos, sin)
        logits = row_logits(q, k, layer_mask(run.valid, r), getattr(attn, "scaling", None), 0, r, n)
        run.keys = k
        if self.method.needs_values:
            run.values = attn.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
        return logits.softmax(-1)  # [B, H, r, L]

    def _drop(self, i: int, hidden: Tensor, run: _Run) -> Tensor:
        """Keep each sample's text tokens and the method's reduction of its visual tokens (each output at its
        earliest source's row); rows left-padded."""
        if self.scored and run.scores is None:
            raise NeverFiredError(f"{self.method.name}: no attention scores reached drop layer {i}")
        budgets = self._budgets[i].tolist()
        b, n = run.index.shape
        rows, merged = [], []  # per sample: the current rows kept (ascending); the reduced visual states or None
        for s in range(b):
            present = run.valid[s].nonzero().flatten()
            visual = run.visual[s, present]
            if not bool(visual.any()):
                rows.append(present)
                merged.append(None)
                continue
            if int(budgets[s]) == 0:  # every visual token deleted: no plan to ask for
                if not bool((~visual).any()):
                    raise StageError(f"{self.method.name}: at layer {i} a sample's prompt is all visual tokens; "
                                     "deleting them leaves no token for the later layers (add text to the prompt)")
                rows.append(present[~visual])
                merged.append(None)
                continue
            attention = None
            if run.scores is not None:
                attention = run.scores[s][..., present].float()
                if attention.shape[1] > 1:
                    attention = attention[:, present]
            cos, sin = run.embeddings
            plan = self.method.plan(LayerContext(
                layer=i, hidden=hidden[s, present], visual=visual, attention=attention, budget=int(budgets[s]),
                inputs=run.inputs[s, run.index[s, present]], visual_inputs=run.inputs[s, run.visual0[s]], rotary=(_row(cos, s, present), _row(sin, s, present)),
                keys=None if run.keys is None else run.keys[s][:, present],
                values=None if run.values is None else run.values[s][:, present],
                prior=None if run.prior is None else run.prior[s, present],
                tiles=run.tiles[s] if run.tiles is not None and int(visual.sum()) == int(run.visual_counts[s]) else None))
            vrows = present[visual]
            anchors = self._check_plan(plan, vrows.numel(), i)
            order = anchors.argsort()
            rows.append(torch.cat([present[~visual], vrows[anchors[order]]]).sort().values)
            merged.append(None if plan.keep_index is not None else
                          (plan.apply(hidden[s, vrows][None])[0][order], vrows[anchors[order]]))
        counts = [r.numel() for r in rows]
        width = max(counts)
        idx = torch.full((b, width), -1, dtype=torch.long, device=hidden.device)  # left-padded compaction
        for s in range(b):
            idx[s, width - counts[s]:] = rows[s]
        run.index = torch.where(idx >= 0, _take(run.index, idx, 1), -1)
        run.visual = torch.where(idx >= 0, _take(run.visual.long(), idx, 1), 0).bool()
        if run.prior is not None:  # each row keeps its own score (a merged row: its place's); padded slots NaN
            run.prior = torch.where(idx >= 0, _take(run.prior, idx, 1), float("nan"))
        pos = run.positions
        run.positions = _take(pos, idx, 1)
        cos, sin = run.embeddings
        run.embeddings = (_take(cos, idx, 2), _take(sin, idx, 2))
        run.mask = self._prefill_mask(run.mask, idx, run.valid, hidden.dtype)
        run.kept_at[i] = [[int(p) for p in row if p >= 0] for row in run.index.tolist()]
        run.dropped = True
        run.scores = run.keys = run.values = None
        out = _take(hidden, idx, 2)
        out = out * (idx >= 0)[..., None].to(out.dtype)
        for s, m in enumerate(merged):
            if m is not None:
                states, at = m
                out[s, width - counts[s] + torch.searchsorted(rows[s], at)] = states.to(out.dtype)
        return out

    def _check_plan(self, plan, num_visual: int, layer: int) -> Tensor:
        """The anchors (earliest source) of a method's plan; a malformed plan is the method's bug: say so."""
        if plan.batch != 1 or plan.num_in != num_visual:
            raise StageError(f"{self.method.name}: at layer {layer} the plan maps {plan.batch} x {plan.num_in} tokens; "
                             f"expected 1 x {num_visual} (the sample's visual tokens)")
        places = self.method.place(plan)
        slots = torch.arange(plan.num_out, device=places.device)
        own = (plan.dest[0, places.clamp_min(0)] == slots if plan.dest is not None
               else plan.matrix[0, slots, places.clamp_min(0)] != 0)
        if plan.num_out < 1 or bool((places < 0).any()) or not bool(own.all()) or places.unique().numel() != places.numel():
            raise StageError(f"{self.method.name}: at layer {layer} the plan places an output token where none of its "
                             "sources is, or two outputs at one place; every output token takes one of its own "
                             "sources' place")
        return places

    def _prefill_mask(self, mask, idx: Tensor, valid: Tensor, dtype) -> Tensor:
        """The kept rows' mask: the layers' own 4-D mask gathered to the kept rows and columns (so Gemma 3's
        bidirectional image blocks stay), or a causal one when the layers had none (SDPA without padding)."""
        if isinstance(mask, Tensor) and mask.dim() == 4:
            return gather_mask(mask, idx, valid)
        n = valid.shape[1]
        own = layer_mask(valid, n) | (torch.eye(n, dtype=torch.bool, device=valid.device)[None, None]
                                      & ~valid[:, None, :, None])
        if self.impl == "eager":
            return torch.zeros(own.shape, dtype=dtype, device=own.device).masked_fill(~own, torch.finfo(dtype).min)
        return own

    # ------------------------------------------------------------------ attention calls
    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        run = self._run
        if run is not None:
            if self.scored and index + 1 in self.drops and self.method.scores_from == "previous":
                q = query.shape[-2]
                lo = 0 if self.method.attention_rows == "all" else q - 1
                mask = attention_mask if run.dropped or attention_mask is not None else None
                if mask is None and not bool(run.valid.all()):
                    mask = layer_mask(run.valid, q)
                logits = row_logits(query, key, mask, kwargs.get("scaling"), lo, q, key.shape[-2])
                run.scores, run.keys = logits.softmax(-1), key  # [B, H, r, L]
                run.values = value if self.method.needs_values else None
            return proceed(query, key, value, attention_mask, **kwargs)
        cache = self._cache  # the attention function does not receive the cache: the backbone hook keeps it
        layer = None
        if isinstance(cache, Cache) and module.layer_idx < len(cache.layers):
            layer = cache.layers[module.layer_idx]
        if self._masks(layer):
            valid = layer.cache_validity(self._padding)
            if valid.shape[1] != key.shape[-2]:
                raise StageError(f"layer {module.layer_idx}: the padding mask covers {valid.shape[1]} of its "
                                 f"{key.shape[-2]} entries; pass a 2-D attention_mask over the whole sequence")
            own = layer_mask(valid, query.shape[-2])
            if self.impl == "eager":
                own = torch.zeros(own.shape, dtype=query.dtype, device=own.device).masked_fill(
                    ~own, torch.finfo(query.dtype).min)
            attention_mask = own
        return proceed(query, key, value, attention_mask, **kwargs)

    # ------------------------------------------------------------------ after the backbone
    def _end(self, backbone, args, kwargs, output):
        self._unflag()
        self._cache = None
        run, self._run = self._run, None
        if run is None:
            return output
        if not run.dropped and self.schedule:
            raise NeverFiredError(f"{self.method.name}: the prompt had visual tokens but no drop layer ran; is the "
                                  "language model truncated (config.num_hidden_layers)?")
        s = InLLMStats(batch_size=run.index.shape[0], no_visual_forwards=self.stats.no_visual_forwards)
        first = self.schedule[0][0] if self.schedule else len(self.layers)
        if self.edits is not None:
            s.masked_attention_flops, s.visual_head_ratio = self.edits.masked_flops, dict(self.edits.ratios)
        valid0 = self._padding if self._padding is not None else None
        prompt = float(valid0.sum(-1).float().mean()) if valid0 is not None else float(run.length)
        vis0 = float(run.visual_counts.float().mean())
        before = [prompt] * first
        s.tokens_per_layer = before + run.tokens_per_layer
        s.mlp_tokens_per_layer = list(s.tokens_per_layer)
        s.visual_tokens_per_layer = [vis0] * first + run.visual_per_layer
        s.visual_tokens, s.prompt_tokens = vis0, prompt
        s.kept_positions = run.kept_at
        if self.after is not None and self._prompt_kept is not None:  # rows of the rewritten prompt -> prompt positions
            s.kept_positions = {k: [[int(self._prompt_kept[b, p]) for p in row] for b, row in enumerate(rows)]
                                for k, rows in run.kept_at.items()}
        widths = [run.length] * first + run.widths
        s.flops = sum(decoder_layer_flops(w, self.info, self.mlp_size) for w in widths)
        s.scoring_flops = sum(self.method.scoring_flops(w, self.info) for w in
                              [widths[k - 1] for k in self.drops])
        s.flops += s.scoring_flops
        s.flops_full = len(widths) * decoder_layer_flops(run.length, self.info, self.mlp_size)
        if self.after is not None:
            s.flops_full = 0.0  # the connector's stats count the whole prompt's reference
        cache = run.cache if run.cache is not None else getattr(output, "past_key_values", None)
        if isinstance(cache, Cache):
            self._compress_cache(cache, run, s)
        self.stats = s
        return output

    def _compress_cache(self, cache: Cache, run: _Run, s: InLLMStats) -> None:
        h = self.info.num_kv_heads
        for i, layer in enumerate(cache.layers):
            idx = run.index_at.get(i)
            if idx is None:
                continue
            if type(layer) is not DynamicLayer or layer.keys.shape[-2] != idx.shape[1]:
                raise StageError(f"layer {i} of the cache holds {getattr(layer, 'keys', None) is not None and layer.keys.shape[-2]}"
                                 f" entries after the pruned prefill, expected {idx.shape[1]}")
            valid = idx >= 0
            new = CompressedLayer(layer.keys, layer.values, run.length, idx[:, None, :].expand(-1, h, -1),
                                  None if bool(valid.all()) else valid)
            new.dropped_by = self
            cache.layers[i] = new
            s.add_kv_layer(i, s.prompt_tokens, float(valid.sum(-1).float().mean()), idx.shape[1],
                           int(kv_bytes(layer) * run.length / max(idx.shape[1], 1)), kv_bytes(new))
        mark_uniform(cache)

    def check_ran(self) -> None:
        self.inputs.check(self.method.name)
