"""VisionDrop — Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (Xu et al., AAAI 2026,
arXiv 2506.22283). The language-model stages.

Text-guided scores suffer from the misalignment of visual and text tokens, so VisionDrop ranks
visual tokens by visual-only evidence: the attention each visual token receives from the other
visual tokens. At the start of each stage ``K`` (the reference: layers 8, 16, 24 of 32), from the
visual tokens present:

1. score: layer ``K``'s norm, Q/K projections and RoPE on its input; the visual tokens' query rows
   over all keys (causal softmax), mean over heads; token ``j``'s score is the mean over the
   visual rows of their attention to ``j`` (rows that cannot see ``j`` count as 0);
2. dominant: the top ``d`` by score;
3. contextual (VisionZip's merge): the remaining tokens, in order, compared by their post-RoPE keys
   at layer ``K`` (mean over heads, L2-normalised); ``c`` targets at a uniform stride, every other
   one joins its most similar target, and a contextual token is its target *plus* the mean of the
   tokens that joined it (the target alone when none did).

Budget: ``layers`` and ``ratios`` natively (defaults: the quarter points of the depth and the
reference's 35, 26 and 19 of the 48 visual tokens that enter the language model), or
``keep_ratio`` = the fraction of visual tokens kept averaged over the layers, met by a pyramid
``lambda^s`` at the given layers (the reference's ratios fall by ~0.73 per stage), or
``schedule``. Each stage's count splits into dominant and contextual tokens as VisionZip's
(``contextual_fraction`` 10/64: 35 = 30 + 5, 26 = 22 + 4, 19 = 16 + 3, the reference's table).

Follows the reference code (Ruixxxx/VisionDrop @ f7a9444, ``modeling_llama_visiondrop.py``,
``visiondrop_rank_drop``). Differences:

* Tower stage: the reference first runs VisionZip in the tower (42 dominant + 6 contextual tokens
  of 576, scored by [CLS] attention); here that is the `visionzip` connector method, composed in
  front: ``apply(model, get_method("visionzip", keep_count=48), get_method("visiondrop"))`` (its
  differences from the reference's tower step are in `visionzip`). This module is the language-model
  stages, on the visual tokens that enter the language model (the stages' ratios are of those).
* Positions and order: the reference renumbers the sequence after each stage (dominant tokens in
  order, then the contextual ones, then the text) and shifts decoding positions to match; here every
  token keeps its position and a contextual token takes its earliest source's place.
* GQA: the reference multiplies queries by keys without repeating KV heads and fails on GQA models;
  each query head reads its KV head here. Batches: the reference runs batch 1 with right padding
  and reads the visual count from its table; samples here are left-padded, each with its own count.
* ``scores_from="previous"`` (an option; needed on M-RoPE models) takes the rows and keys from layer
  ``K - 1``'s own attention call instead of re-projecting at layer ``K``.
* Counts per stage come from the schedule (``floor(fraction * N)`` of the original ``N``), not a
  hard-coded table for 576 tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import BudgetError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_choice, check_float, check_fractions, check_ints
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.schedule import fit_schedule
from .visionzip import split_budget

REFERENCE_RATIOS = (35 / 48, 26 / 48, 19 / 48)


def visual_received(attention: Tensor, visual: Tensor) -> Tensor:
    """Each visual token's mean attention received from the visual rows [v], from softmax rows [H, n, n]."""
    a = attention.mean(0)[visual][:, visual]
    return a.mean(0)


def contextual_merge(hidden_keys: Tensor, dominant: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual merge of the non-``dominant`` tokens (bool [v]) into ``c`` tokens by their keys [v, Dh]:
    ``(dest, coef)`` [v] for the non-dominant tokens (dest in 0..c-1; coef 1 for a target, 1/joined otherwise)."""
    rest = (~dominant).nonzero().flatten()
    r = rest.numel()
    metric = hidden_keys[rest].float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, r // c)
    targets = torch.arange(0, r, step, device=rest.device)[:c]
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[targets] = True
    group = torch.empty(r, dtype=torch.long, device=rest.device)
    group[targets] = torch.arange(targets.numel(), device=rest.device)
    others = (~is_target).nonzero().flatten()
    group[others] = (metric[others] @ metric[targets].T).argmax(-1)
    joined = torch.bincount(group[others], minlength=targets.numel()).clamp_min(1)
    coef = torch.where(is_target, 1.0, 1.0 / joined[group].float())
    return group, coef


@register
class VisionDrop(LayerDropMethod):
    name = "visiondrop"
    paper = "VisionDrop: Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (Xu et al., 2026)"
    arxiv = "2506.22283"
    scores_from = "own"
    attention_rows = "all"

    def __init__(self, keep_ratio: float | None = None, layers=None, ratios=None,
                 contextual_fraction: float = 10 / 64, scores_from: str = "own", schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(layers=layers, ratios=ratios)
        self.layers = check_ints(self.name, "layers", layers, min=1, optional=True,
                                 why="the first layer (0-based) of each stage; None = the quarter points")
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise BudgetError(f"{self.name}: layers must be distinct and ascending; got {list(self.layers)}")
        self.ratios = check_fractions(self.name, "ratios", ratios, optional=True, why="the fraction of the visual tokens kept from each stage on")
        if self.ratios is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or ratios, not both")
        if self.ratios is not None and list(self.ratios) != sorted(self.ratios, reverse=True):
            raise BudgetError(f"{self.name}: ratios must not grow from stage to stage; got {list(self.ratios)}")
        self.contextual_fraction = check_float(self.name, "contextual_fraction", contextual_fraction, min=0.0,
                                               max=1.0, max_open=True, why="the share of each stage's count merged")
        self.scores_from = check_choice(self.name, "scores_from", scores_from, ("own", "previous"),
                                        why="'own' = layer K's projections (the reference)")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"ratios={list(self.ratios or REFERENCE_RATIOS)}"
        return what + (f", layers={list(self.layers)}" if self.layers else "")

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        n = info.num_layers
        layers = list(self.layers) if self.layers else sorted({round(n * s / 4) for s in (1, 2, 3)} - {0})
        if not layers or layers[-1] >= n:
            raise BudgetError(f"{self.name}: stage layers {layers} do not fit this language model's {n} layers")
        if self.budget is None:
            ratios = list(self.ratios or REFERENCE_RATIOS)
            if len(ratios) != len(layers):
                raise BudgetError(f"{self.name}: {len(ratios)} ratios for {len(layers)} stage layers {layers}; give "
                                  "one ratio per stage")
            return list(zip(layers, ratios))
        lowest = self.mean_kept([(k, 0.0) for k in layers], n)
        if self.budget.ratio <= lowest:
            raise BudgetError(f"{self.name}: keep_ratio={self.budget.ratio} is below what stages at {layers} of {n} "
                              f"layers can reach ({lowest:.3f}); raise keep_ratio or start the first stage later")
        return fit_schedule(lambda lam: [(k, lam ** (s + 1)) for s, k in enumerate(layers)], self.budget.ratio, n)

    def plan(self, ctx: LayerContext) -> Reduction:
        v = int(ctx.visual.sum())
        dev = ctx.hidden.device
        d, c = split_budget(ctx.budget, self.contextual_fraction)
        if d + c >= v:
            return Reduction.identity(1, v, device=dev)
        score = visual_received(ctx.attention, ctx.visual)
        top = score.sort(descending=True, stable=True).indices[:d]
        dominant = torch.zeros(v, dtype=torch.bool, device=dev)
        dominant[top] = True
        dest = torch.full((v,), -1, dtype=torch.long, device=dev)
        coef = torch.ones(v, device=dev)
        dest[dominant] = torch.arange(d, device=dev)
        if c > 0:
            keys = ctx.keys.float().mean(0)[ctx.visual]  # [v, Dh] post-RoPE, mean over heads
            group, weight = contextual_merge(keys, dominant, c)
            dest[~dominant], coef[~dominant] = d + group, weight
        return Reduction(num_out=int(dest.max()) + 1, dest=dest[None], coef=coef[None])

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        qd, kvd, h = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
        projections = 2.0 * h * length * (qd + kvd) if self.scores_from == "own" else 0.0  # layer K's Q, K again
        return projections + super().scoring_flops(length, info)
