"""LLaVolta's Visual Context Compressor, used at test time — Efficient Large Multi-modal Models via Visual Context
Compression (Chen, Ye, Yan, Wang, Yuille and others, NeurIPS 2024, arXiv 2406.20092).

The visual tokens of a VLM's language model are redundant after the first layers, so at layer
``K`` average-pool them: each image's tokens, in their raster order, are split into windows of
``s`` consecutive tokens, and from layer ``K`` on each window is one token, the plain mean of the
window's hidden states, at the window's middle position (the truncated mean of its position ids).
Text tokens are untouched. No attention is read: the compressor has no parameters, which is
why it runs on any checkpoint without training (LLaVolta's staged *training* schedule, whose
last stage runs uncompressed, is not part of this library).

Budget: ``layer`` and ``stride`` natively (defaults ``K = 2``, ``s = 8``: the reference's "heavy
compression" evaluation, 576 -> 72 tokens from layer 2 of 32), or ``keep_ratio`` = the fraction of
visual tokens kept averaged over the layers, which at ``layer`` fixes the windows per image
(``floor(keep_ratio' * n)`` windows of near-equal length, ``keep_ratio' = (keep_ratio L - K) / (L - K)``),
or ``schedule`` = any per-layer schedule, each drop pooling the tokens present into the counted
number of windows.

Follows the reference code (Beckschen/LLaVolta @ 31ec151, ``llava_llama.py``: ``visual_operating``,
``visual_avg_pool1d``; the eval scripts' ``--grouping avgpool1d --layer --stride``). Differences:

* Spans: the reference pools a hard-coded 576-token span per image start (LLaVA-1.5 only) and
  assumes right padding; we pool each sample's visual tokens found from its input ids (all
  images of a prompt form one run, as the reference's windows never cross an image when ``s``
  divides its length), samples left-padded.
* Windows: with ``stride`` the windows are ``s`` tokens and a remainder shorter than ``s`` is
  dropped, as ``avg_pool1d``; with ``keep_ratio`` (not in the reference) ``m`` windows of
  near-equal length cover every token.
* Position: the reference averages the window's position ids in float16 and truncates (exact
  below 2048); we take the position of the window's middle token (``floor((first + last) / 2)``),
  the same number for consecutive positions, without the float16 rounding.
* Masks: the reference slices the top-left corner of a 2-D mask (wrong under padding); ours is
  rebuilt for the kept rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import BudgetError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_int
from ..core.reduction import Reduction
from ..core.registry import register


def windows(n: int, count: int, stride: int | None) -> Tensor:
    """The window (0..count-1, or -1 = dropped remainder) of each of ``n`` tokens: ``stride``-token windows, or
    ``count`` near-equal windows covering all ``n`` tokens when ``stride`` is None."""
    i = torch.arange(n)
    if stride is not None:
        w = i // stride
        return torch.where(w < count, w, -1)
    return torch.div(i * count, n, rounding_mode="floor")


@register
class LLaVolta(LayerDropMethod):
    name = "llavolta"
    paper = "Efficient Large Multi-modal Models via Visual Context Compression (Chen et al., NeurIPS 2024)"
    arxiv = "2406.20092"
    attention_rows = "none"

    def __init__(self, keep_ratio: float | None = None, layer: int | None = None, stride: int | None = None,
                 schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(layer=layer, stride=stride)
        self.layer = check_int(self.name, "layer", 2 if layer is None else layer, min=1,
                               why="the first layer (0-based) that sees the pooled tokens; None = 2, the reference's")
        self.stride = check_int(self.name, "stride", stride, min=2, optional=True,
                                why="tokens averaged into one (kernel = stride)")
        if self.stride is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or stride, not both")
        if self.stride is None and self.budget is None and self.given_schedule is None:
            self.stride = 8

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"stride={self.stride}"
        return f"{what}, layer={self.layer}"

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        n, k = info.num_layers, self.layer
        if k >= n:
            raise BudgetError(f"{self.name}: layer={k} is beyond this language model's {n} layers; use layer <= {n - 1}")
        if self.stride is not None:
            return [(k, 1.0 / self.stride)]
        fraction = (self.budget.ratio * n - k) / (n - k)
        if fraction <= 0:
            raise BudgetError(f"{self.name}: keep_ratio={self.budget.ratio} cannot be reached when every visual token "
                              f"stays in the first {k} of {n} layers (the lowest is {k / n:.3f}); raise keep_ratio or "
                              "lower layer")
        return [(k, fraction)]

    def plan(self, ctx: LayerContext) -> Reduction:
        n = int(ctx.visual.sum())
        stride = self.stride if self.given_schedule is None and self.stride is not None else None
        count = min(n, ctx.budget if stride is None else n // stride)
        if count < 1:
            raise BudgetError(f"{self.name}: stride={stride} exceeds the {n} visual tokens of a sample; lower stride")
        dest = windows(n, count, stride).to(ctx.hidden.device)
        return Reduction.merge(dest[None], count, torch.ones(1, n, device=ctx.hidden.device))

    def place(self, plan: Reduction) -> Tensor:
        first = plan.anchors()[0]
        last = torch.full_like(first, -1).scatter_reduce(
            0, plan.dest[0].clamp_min(0), torch.arange(plan.num_in, device=first.device).masked_fill(plan.dest[0] < 0, -1),
            reduce="amax")
        return torch.div(first + last, 2, rounding_mode="floor")

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        return 0.0  # the means are the reduction itself
