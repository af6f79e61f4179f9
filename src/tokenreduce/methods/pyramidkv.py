"""PyramidKV — Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024, arXiv 2406.02069).

Attention funnels from broad in the lower layers to a few tokens in the upper ones, so
PyramidKV spends the cache budget unevenly: most entries in the first layer, the fewest in
the last, decreasing linearly, with the mean over layers equal to the budget. Which
entries a layer keeps is SnapKV's rule (observation-window attention, pooled, top-k per KV
head, the window always kept).

Per-layer budget (the paper's formula, as kvpress writes it): with ``M`` the mean budget,
``L`` compressible layers and ``l`` a layer's rank among them, the top layer keeps
``M / beta``, the bottom one ``2M - M / beta``, linearly in between; if the bottom layer
would exceed the context ``n``, it keeps ``n`` and the top ``2M - n``. Counts are rounded
so that the layers' total is exactly ``L * M`` (largest remainders); every layer keeps at
least one entry, which lifts the total above ``L * M`` only when ``M / beta`` is far below 1.

Differences from the reference code (Zefan-Cai/KVCache-Factory ``PyramidKVCluster``; kvpress
``PyramidKVPress``):

* The budget counts the observation window (kvpress; the reference adds the window on top
  of its per-layer count) and the layers' total is exact (the reference floors its step,
  kvpress rounds each layer).
* No silent fallback: the reference keeps everything when ``n`` is below its capacity and
  goes uniform below twice its capacity; kvpress goes uniform whenever the top layer's
  count is below the window. We always apply the pyramid; a layer whose count is below
  the window keeps its most recent entries (SnapKV's rule here).
* Scoring, GQA, padding and defaults are our SnapKV's (``window_size=32, kernel_size=5,
  avgpool``; the paper's LongBench runs use 8 / 7 / maxpool), ``beta=20`` as both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.method import DecoderInfo
from ..core.params import check_float
from ..core.registry import register
from .snapkv import SnapKV


def pyramid_budgets(mean: Tensor, lengths: Tensor, num_layers: int, beta: float) -> Tensor:
    """Integer budgets ``[L, B]``: linear from bottom to top, mean ``mean`` [B] exactly, each in [1, lengths]."""
    m = mean.to(torch.float64)
    n = lengths.to(torch.float64)
    top = m / beta
    bottom = 2 * m - top
    over = bottom > n
    bottom = torch.where(over, n, bottom)
    top = torch.where(over, 2 * m - n, top)
    if num_layers == 1:
        return mean[None].clone()
    frac = torch.arange(num_layers, dtype=torch.float64)[:, None] / (num_layers - 1)
    k = (bottom - frac * (bottom - top)).clamp_min(1.0)  # [L, B]
    base = torch.floor(k)
    short = (num_layers * mean.to(torch.long) - base.sum(0).to(torch.long))  # [B], what rounding down lost
    # hand the lost entries to the largest remainders (ties to the lower layer); clamping to 1 can only add
    order = torch.argsort(-(k - base) + 1e-9 * torch.arange(num_layers, dtype=torch.float64)[:, None], dim=0)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(num_layers)[:, None].expand_as(order))
    base = base + (rank < short.clamp_min(0)[None]).to(base.dtype)
    return base.to(torch.long).minimum(lengths.to(torch.long)[None])


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024)"
    arxiv = "2406.02069"

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, window_size: int = 32,
                 kernel_size: int = 5, pooling: str = "avgpool", beta: float = 20.0):
        super().__init__(keep_ratio, keep_count, window_size, kernel_size, pooling)
        self.beta = check_float(self.name, "beta", beta, min=1.0, why="controls the bottom-to-top budget ratio")

    def describe(self) -> str:
        return f"{super().describe()}, beta={self.beta}"

    def layer_budgets(self, lengths: Tensor, layer: int, info: DecoderInfo) -> Tensor:
        layers = info.compressible
        if layer not in layers:
            return self.budgets(lengths)
        table = pyramid_budgets(self.budgets(lengths), lengths, len(layers), self.beta)
        return table[layers.index(layer)].to(lengths.device)
