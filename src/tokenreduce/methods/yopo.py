"""YOPO, its training-free parts — Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See
(Zhang, Pham, Zhao, Wan, Li, Zhou, Miranda, Kale and Xu, 2024, arXiv 2410.06169).

Visual tokens need less of a VLM's language model than text. ``parts`` picks which of the paper's
training-free strategies run (any subset, each usable alone):

``"skip"`` (default) — layer skipping for visual computation: from layer ``K`` on no query attends to
a visual key, which is the same as deleting every visual token from the hidden states (and from those
layers' KV cache) at layer ``K``. Nothing is scored. Runs at the decoder stage (`runtime.in_llm`) as
the schedule ``[(K, 0)]``: layers ``>= K`` run on the text tokens only and cache only them, a real
saving of about ``(L - K) / L`` of the visual tokens' prefill work.

``"heads"`` — inactive visual attention heads: in layers before ``K`` the heads ``heads[layer]``
leaves out stop attending to visual keys: their softmax weights on visual keys are set to 0 *after*
the softmax, not renormalised (prefill and decoding). Which heads: ``tokenreduce.calibrate(method,
model, batches)`` runs the unpruned model on calibration prompts and ranks each head of layers ``>= 2``
by the last prompt row's attention mass on visual keys over its mass on the other keys (mean over the
prompts); the top ``head_keep`` of them stay active, every head of layers 0 and 1 too. Or pass the
result, ``heads`` = for each layer the list of heads that keep attending (``method.heads`` after
calibration).

``"neighbour"`` — neighbour-aware visual attention: in the prefill a visual query sees only the visual
keys of its own image within ``window x window`` grid cells (and earlier ones: causal); text keys as
before; ``window=1`` (default) = only itself, the reference's training-free form.

Honest savings: ``"heads"`` and ``"neighbour"`` *mask* (every head still computes every key), so
they save nothing here; ``stats.masked_attention_flops`` is the attention work a kernel that skipped
the masked entries would save (the prefill's QK^T and AV products), never subtracted from ``flops``.

Budget: ``skip_from`` = ``K`` natively (default ``round(24/28 L)``, the reference's training-free
Qwen2-VL setting, layer 24 of 28), or ``keep_ratio`` = the fraction of visual tokens kept averaged over
the ``L`` layers = ``K / L``: ``K = round(keep_ratio L)`` (within ``1 / (2L)`` of ``keep_ratio``; a ``K``
outside ``1..L-1`` is refused). Without ``"skip"`` no token is dropped and neither is accepted. A
per-layer ``schedule`` of partial fractions is refused: YOPO ranks no visual tokens.

Reference code read: ZhangAIPI/YOPO_MLLM_Pruning @ f0783f4. Its LLaVA code (``modeling_llama_prune.py``)
masks and goes with retrained checkpoints (window 5, layer cut 20 of 40, sparse FFN); the training-free
code is ``modeling_qwen2_vl.py`` (``layercut_idx = 24``: logits of every query on visual keys set to
``-inf`` before the softmax; ``headcut`` from layer 2: the post-softmax weights on visual keys times a
0/1 head mask; ``attncut``: visual rows see no visual key but their own) with the head ratios of
``gen_mask_internvl_qwen.py`` / ``gen_mask_llava.py``. Differences:

* Skip: deletion, not masking: the reference still computes the visual rows in every layer (no
  saving); deleting them gives the text tokens the same outputs (they never read a visual key from
  ``K`` on). The reference masks query rows ``image_token_num:`` rather than
  ``offset + image_token_num:`` (so its last ``offset`` visual rows lose all visual keys too); with
  deletion that does not arise.
* Spans: the reference hard-codes the system prompt's length (``offset = 15``; LLaVA 35) and 576 or a
  global image-token count, batch size 1; we find each sample's visual tokens from the input ids
  (left-padded batches, several images).
* Head ratios: the reference measures the first decoding step's query (Qwen/InternVL, thresholded by
  hand, e.g. 0.07) or every prefill row with a majority vote over 100 prompts (LLaVA); we measure the
  last prompt row (what one calibration forward has; it predicts the first answer token) and keep a
  fraction ``head_keep`` by rank, which is a global threshold chosen to keep that many heads. The
  reference loads its mask from disk in every forward of every layer; ours is given once.
* Heads after ``K``: the reference applies the head mask in every layer >= 2; after the skip no visual
  key is left, so it has nothing to do there.
* Neighbour: the trained LLaVA's window also lets a visual query see *later* neighbours (it
  overwrites the causal block); a training-free causal model never saw that, so ours stays causal.
  The window needs each image's tokens as one square grid (a LLaVA-NeXT run with newline tokens is
  refused for ``window > 1``).
* Sparse visual FFN (the paper's fourth strategy) needs training: not built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import BudgetError, CalibrationError, ParameterError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_float, check_int
from ..core.reduction import Reduction
from ..core.registry import register

REFERENCE_SKIP = (24, 28)  # the training-free Qwen2-VL setting: visual computation stops at layer 24 of 28
FIRST_HEAD_LAYER = 2  # the reference's head mask starts at layer 2 (layers 0 and 1 keep every head)
PARTS = ("skip", "heads", "neighbour")


def check_parts(name: str, parts) -> tuple[str, ...]:
    if isinstance(parts, str) or not isinstance(parts, (tuple, list)) or not parts or \
            any(not isinstance(p, str) or p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ParameterError(f"{name}: parts must be a non-empty tuple of distinct names from {PARTS}, e.g. "
                             f"('skip',) or ('skip', 'heads'); got {parts!r}")
    return tuple(parts)


def check_heads(name: str, heads) -> tuple[tuple[int, ...], ...] | None:
    """``heads``: per layer, the query heads that keep attending to visual keys (a list of lists of ints)."""
    if heads is None:
        return None
    ok = isinstance(heads, (list, tuple)) and all(
        isinstance(h, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in h)
        and len(set(h)) == len(h) for h in heads)
    if not ok or not heads:
        raise ParameterError(f"{name}: heads must be one list per layer of the query heads (ints >= 0, no repeats) "
                             f"that keep attending to visual keys, e.g. [[0, 1, 2, 3], [0, 1, 2, 3], [1, 3]]; got "
                             f"{heads!r}")
    return tuple(tuple(sorted(h)) for h in heads)


@register
class YOPO(LayerDropMethod):
    name = "yopo"
    paper = ("Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See (Zhang et al., 2024): the "
             "training-free parts")
    arxiv = "2410.06169"
    attention_rows = "none"
    runs_schedules = False

    def __init__(self, keep_ratio: float | None = None, skip_from: int | None = None, parts=("skip",),
                 heads=None, head_keep: float | None = None, window: int | None = None, schedule=None):
        super().__init__(keep_ratio, schedule)  # checks what a schedule must be
        if self.given_schedule is not None:
            raise BudgetError(f"{self.name}: deletes every visual token at one layer and has no ranking of visual "
                              "tokens, so it cannot run a schedule of partial fractions; pass skip_from (the first "
                              "layer without visual tokens) or keep_ratio (= skip_from / layers)")
        self.parts = check_parts(self.name, parts)
        self.skip_from = check_int(self.name, "skip_from", skip_from, min=1, optional=True,
                                   why="the first layer (0-based) that runs without visual tokens; None = "
                                       "round(24/28 of the layers), the reference's")
        self.heads = check_heads(self.name, heads)
        self.head_keep = check_float(self.name, "head_keep", head_keep, min=0.0, max=1.0, min_open=True,
                                     optional=True, why="the fraction of the heads of layers >= 2 that calibration "
                                                        "keeps attending to visual keys")
        self.window = check_int(self.name, "window", window, min=1, odd=True, optional=True,
                                why="the grid cells (window x window) a visual query sees of its image's visual "
                                    "keys; 1 = itself only")
        if self.skip_from is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or skip_from, not both (keep_ratio = skip_from / layers)")
        if "skip" not in self.parts and (self.skip_from is not None or self.budget is not None):
            raise BudgetError(f"{self.name}: keep_ratio and skip_from are the budget of the 'skip' part, which "
                              f"parts={self.parts} leaves out; add 'skip' to parts or drop them (the other parts "
                              "drop no token: they mask attention)")
        if "heads" not in self.parts and (self.heads is not None or self.head_keep is not None):
            raise ParameterError(f"{self.name}: heads and head_keep belong to the 'heads' part; add 'heads' to parts")
        if self.heads is not None and self.head_keep is not None:
            raise ParameterError(f"{self.name}: give heads (a calibration's result) or head_keep (for calibrating), "
                                 "not both")
        if "neighbour" not in self.parts and self.window is not None:
            raise ParameterError(f"{self.name}: window belongs to the 'neighbour' part; add 'neighbour' to parts")
        if "neighbour" in self.parts and self.window is None:
            self.window = 1
        if "heads" in self.parts and self.heads is None and self.head_keep is None:
            self.head_keep = 0.75  # InternVL2-8B's released mask: 24 of 32 heads on average
        self._calibrating = False
        self._sums: dict[int, Tensor] = {}
        self._counts: dict[int, Tensor] = {}
        self.needs_calibration = "heads" in self.parts  # this instance: tokenreduce.calibrate picks the heads

    def describe(self) -> str:
        out = []
        if "skip" in self.parts:
            out.append(f"keep_ratio={self.budget.ratio}" if self.budget is not None else
                       f"skip_from={self.skip_from}" if self.skip_from is not None else "skip_from=round(24/28 L)")
        if "heads" in self.parts:
            out.append(f"heads={'calibrated' if self.heads is not None else 'uncalibrated'}"
                       + (f" (head_keep={self.head_keep})" if self.head_keep is not None else ""))
        if "neighbour" in self.parts:
            out.append(f"window={self.window}")
        return ", ".join(out)

    # ------------------------------------------------------------------ part 1: layer skipping
    def skip_layer(self, num_layers: int) -> int:
        """``K``, the first layer without visual tokens, for a language model of ``num_layers`` layers (checked)."""
        n = num_layers
        if self.skip_from is not None:
            k, why = self.skip_from, f"skip_from={self.skip_from}"
        elif self.budget is not None:
            k = round(self.budget.ratio * n)
            why = f"keep_ratio={self.budget.ratio} gives skip_from = round({self.budget.ratio} x {n}) = {k}, which"
        else:
            k = round(REFERENCE_SKIP[0] / REFERENCE_SKIP[1] * n)
            why = f"the default skip_from = round(24/28 x {n}) = {k}"
        if not 1 <= k <= n - 1:
            lo, hi = 0.5 / n, (n - 0.5) / n
            raise BudgetError(f"{self.name}: {why} is outside this language model's layers 1..{n - 1} ({n} layers); "
                              f"pass skip_from in 1..{n - 1} or keep_ratio in [{lo:.3f}, {hi:.3f})")
        return k

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        if self.heads is not None and "heads" in self.parts and not self._calibrating:
            self._check_heads(info)
        if self.reduces_nothing:  # keep_ratio=1.0: the runtime fires and reduces nothing; a valid no-op schedule
            return [(info.num_layers - 1, 1.0)]
        if "skip" not in self.parts or self._calibrating:  # calibration measures the unpruned model
            return []
        return [(self.skip_layer(info.num_layers), 0.0)]

    def plan(self, ctx: LayerContext) -> Reduction:  # the runtime deletes every visual token at a 0 budget
        raise AssertionError(f"{self.name} keeps no visual token; the runtime never asks it to plan")

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        return 0.0  # nothing is scored

    # ------------------------------------------------------------------ part 2: inactive visual heads
    def _check_heads(self, info: DecoderInfo) -> None:
        if len(self.heads) != info.num_layers:
            raise BudgetError(f"{self.name}: heads lists {len(self.heads)} layers; this language model has "
                              f"{info.num_layers}: calibrate on this model (tokenreduce.calibrate) or pass one list "
                              "per layer")
        bad = [(i, h) for i, hs in enumerate(self.heads) for h in hs if h >= info.num_heads]
        if bad:
            raise BudgetError(f"{self.name}: heads names head {bad[0][1]} at layer {bad[0][0]}; this language model "
                              f"has {info.num_heads} query heads (0..{info.num_heads - 1})")

    def visual_heads(self, layer: int, num_heads: int) -> Tensor | None:
        if "heads" not in self.parts or self._calibrating or self.reduces_nothing:
            return None
        if self.heads is None:
            raise CalibrationError(f"{self.name}: the 'heads' part needs the heads that keep attending to visual keys: "
                                   "run tokenreduce.calibrate(method, model, batches) on calibration prompts first, "
                                   "or pass heads= (one list per layer)")
        on = torch.zeros(num_heads, dtype=torch.bool)
        on[list(self.heads[layer])] = True
        return on

    @property
    def measures_visual_heads(self) -> bool:
        return self._calibrating

    def begin_calibration(self) -> None:
        if "heads" not in self.parts:
            raise CalibrationError(f"{self.name}: only the 'heads' part is calibrated; parts={self.parts}")
        self._calibrating, self._sums, self._counts = True, {}, {}

    def observe_forward(self, stats, items: int) -> None:
        for layer, ratio in stats.visual_head_ratio.items():
            ratio = ratio.detach().double().cpu()
            seen = ~ratio.isnan()
            self._sums[layer] = self._sums.get(layer, 0) + torch.where(seen, ratio, 0.0).sum(0)
            self._counts[layer] = self._counts.get(layer, 0) + seen.sum(0)

    def end_calibration(self, completed: bool) -> None:
        self._calibrating = False
        sums, counts, self._sums, self._counts = self._sums, self._counts, {}, {}
        if not completed:
            return
        if not sums or not any(bool((c > 0).any()) for c in counts.values()):
            raise CalibrationError(f"{self.name}: no calibration prompt carried visual tokens; calibrate on image "
                                   "prompts")
        layers = max(sums) + 1
        mean = {i: sums[i] / counts[i].clamp_min(1) for i in range(layers)}
        num_heads = mean[0].numel()
        ranked = [(float(mean[i][h]), i, h) for i in range(FIRST_HEAD_LAYER, layers) for h in range(num_heads)]
        keep = math.floor(self.head_keep * len(ranked) + 1e-9)
        kept = {(i, h) for _, i, h in sorted(ranked, key=lambda t: (-t[0], t[1], t[2]))[:keep]}
        self.heads = tuple(tuple(range(num_heads)) if i < FIRST_HEAD_LAYER else
                           tuple(h for h in range(num_heads) if (i, h) in kept) for i in range(layers))
        self.head_ratio = mean  # layer -> [H] the measured mean ratios, for reading

    # ------------------------------------------------------------------ part 3: neighbour-aware visual attention
    def visual_window(self) -> int | None:
        return None if "neighbour" not in self.parts or self._calibrating or self.reduces_nothing else self.window
