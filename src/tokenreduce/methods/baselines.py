"""Baselines every table needs: random token dropping and spatial average pooling.

Neither has a paper of its own. Random drop uses EViT's schedule (keep rate at a quarter,
half and three quarters of the depth) with uniformly random kept tokens, in their original
order. Pooling averages ``k x k`` windows of the patch grid at one block (size-weighted, so
sizes feed proportional attention); ``keep_ratio`` picks the block and window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.budget import mean_kept
from ..core.errors import BudgetError, StageError
from ..core.method import EncoderInfo, EncoderMethod, generator_for
from ..core.params import check_int, check_seed
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .evit import StagedPruner


@register
class RandomDrop(StagedPruner):
    name = "random"
    paper = "baseline: uniformly random token dropping (EViT schedule)"
    arxiv = None

    def __init__(self, keep_rate: float | None = None, keep_ratio: float | None = None, locations=None, seed: int = 0):
        super().__init__(keep_rate, keep_ratio, locations)
        self.seed = check_seed(self.name, "seed", seed)

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        super().start(info, num_tokens)
        self._gen = None

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        b, n, _ = x.shape
        p = tokens.num_prefix
        left = self.kept_count(n, p)
        if left >= n - p:
            return None
        if self._gen is None:
            self._gen = generator_for(self.seed, "cpu")
        scores = torch.rand(b, n - p, generator=self._gen).to(x.device)
        if tokens.valid is not None:
            scores = scores.masked_fill(~tokens.valid[:, p:], -1.0)
        idx = scores.topk(left, dim=1).indices.sort(dim=1).values
        return Reduction.keep(torch.cat([torch.arange(p, device=x.device).expand(b, p), p + idx], 1), n)


def pooled_count(grid: tuple[int, int], k: int) -> int:
    return -(-grid[0] // k) * -(-grid[1] // k)


@register
class SpatialPool(EncoderMethod):
    name = "pool"
    paper = "baseline: k x k spatial average pooling of patch tokens at one block"
    arxiv = None
    prop_attn = True
    needs_grid = True  # pools the intact patch grid: reduces before every other method

    def __init__(self, kernel: int | None = None, layer: int | None = None, keep_ratio: float | None = None):
        super().__init__(keep_ratio)
        kernel = check_int(self.name, "kernel", kernel, min=2, optional=True, error=BudgetError,
                           why="pooling window side; None = 2")
        layer = check_int(self.name, "layer", layer, min=0, optional=True, error=BudgetError,
                          why="0-based block index; None = 0")
        if keep_ratio is not None and (kernel is not None or layer is not None):
            raise BudgetError("pool: give keep_ratio, or kernel/layer, not both")
        self.kernel, self.layer = kernel, layer

    def describe(self) -> str:
        return f"kernel={self.kernel}, layer={self.layer}" if self.budget is None else super().describe()

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        if info.patch_grid is None:
            raise StageError(f"pool needs a square patch grid; got {num_tokens - info.num_prefix} patch tokens")
        self._grid = info.patch_grid
        if self.budget is None:
            self._k, self._layer = self.kernel or 2, self.layer if self.layer is not None else 0
            return
        best = None
        for k in (2, 3, 4):
            m = info.num_prefix + pooled_count(self._grid, k)
            for layer in range(info.num_layers):
                ratio = mean_kept([num_tokens] * layer + [m] * (info.num_layers - layer), num_tokens)
                gap = abs(ratio - self.budget.ratio)
                if best is None or gap < best[0] - 1e-12:
                    best = (gap, k, layer)
        _, self._k, self._layer = best

    def wants_signals(self, layer: int) -> bool:
        return layer == self._layer

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        b, n, _ = x.shape
        p, (h, w), k = tokens.num_prefix, self._grid, self._k
        if n != p + h * w:
            raise StageError("pool must run before any other reduction changes the patch grid")
        rows = torch.arange(h, device=x.device).repeat_interleave(w) // k
        cols = torch.arange(w, device=x.device).repeat(h) // k
        patch_dest = p + rows * (-(-w // k)) + cols
        dest = torch.cat([torch.arange(p, device=x.device), patch_dest]).expand(b, n)
        return Reduction.merge(dest, p + pooled_count((h, w), k), tokens.sizes)
