"""Connector baselines every VLM table needs: random visual tokens, and spatial average pooling of the grid.

Neither has a paper of its own; both run at the connector stage (after the projector, where the
visual tokens enter the language model), per image, with the budget of every connector method
(``keep_ratio`` of each image's visual tokens, ``floor``, at least 1; or ``keep_count``).

* ``visual_random``: a uniformly random subset of the budget's size, in the original order (its
  generator is seeded once per forward, so a batch differs from its samples run alone only by the
  draws, never by the budget).
* ``visual_pool``: the downsampling baseline (LLaVA-style average pooling of the projected
  features, as LLaVA-OneVision pools video frames 2x2): the image's ``h x w`` raster grid is cut
  into an ``oh x ow`` partition of contiguous windows (boundaries ``round(i h / oh)``), each window
  averaged into one token placed at its first token's position. ``(oh, ow)`` is the largest grid
  with ``oh * ow <= budget`` whose aspect stays within 2x of the image's, so ``keep_ratio`` 0.25 of
  a 12 x 12 grid pools 2x2 windows into 6 x 6. Every source token lands in exactly one window
  (sizes sum to ``h w``). Needs a square raster grid of visual tokens (LLaVA-1.5); tiled images
  with newline tokens (LLaVA-NeXT) are refused.
"""

from __future__ import annotations

import torch

from ..core.budget import check_keep_count, check_keep_ratio
from ..core.errors import StageError
from ..core.method import ConnectorMethod, VisualContext
from ..core.params import check_seed
from ..core.reduction import Reduction
from ..core.registry import register


@register
class VisualRandom(ConnectorMethod):
    name = "visual_random"
    paper = "baseline: uniformly random visual tokens at the connector"
    arxiv = None

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, seed: int = 0):
        keep_ratio = check_keep_ratio(self.name, keep_ratio)
        keep_count = check_keep_count(self.name, keep_count)
        super().__init__(keep_ratio, keep_count)
        self.seed = check_seed(self.name, "seed", seed)

    def plan(self, ctx: VisualContext) -> Reduction:
        n = ctx.features.shape[0]
        order = torch.randperm(n, generator=ctx.generator, device="cpu")[: ctx.budget]
        return Reduction.keep(order.sort().values[None].to(ctx.features.device), n)


def pooled_grid(grid: tuple[int, int], budget: int) -> tuple[int, int]:
    """The largest ``(oh, ow)`` with ``oh * ow <= budget``, ``oh <= h``, ``ow <= w``, aspect within 2x of the grid's."""
    h, w = grid
    best = (1, 1)
    for oh in range(1, h + 1):
        ow = min(w, budget // oh)
        if ow < 1:
            break
        aspect = (oh / ow) / (h / w)
        if 0.5 <= aspect <= 2.0 and oh * ow > best[0] * best[1]:
            best = (oh, ow)
    return best


def window_of(n: int, parts: int) -> torch.Tensor:
    """For each of ``n`` rows (or columns), the window it falls in when cut into ``parts`` contiguous windows."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    out = torch.empty(n, dtype=torch.long)
    for i in range(parts):
        out[bounds[i]:bounds[i + 1]] = i
    return out


@register
class VisualPool(ConnectorMethod):
    name = "visual_pool"
    paper = "baseline: spatial average pooling of the visual tokens at the connector"
    arxiv = None
    needs_grid = True

    def plan(self, ctx: VisualContext) -> Reduction:
        n = ctx.features.shape[0]
        if ctx.grid is None:
            raise StageError(f"{self.name} pools a square raster grid of visual tokens; this image has {n} tokens that "
                             "are not one (tiled images, newline tokens); use visual_random or fastervlm")
        h, w = ctx.grid
        oh, ow = pooled_grid((h, w), ctx.budget)
        rows, cols = window_of(h, oh), window_of(w, ow)
        dest = (rows[:, None] * ow + cols[None, :]).flatten()[None].to(ctx.features.device)
        return Reduction.merge(dest, oh * ow, torch.ones(1, n, device=ctx.features.device))
