"""EViT — Not All Patches Are What You Need (Liang et al., ICLR 2022, arXiv 2202.07800).

At a few blocks (default the 4th, 7th and 10th of 12: 0-based 3, 6, 9 — a quarter, half
and three quarters of the depth for other depths), after the attention residual, keep the
``ceil(keep_rate * (N - 1))`` tokens the [CLS] token attends to most (head-averaged softmax
row of [CLS], the same attention the block just computed) and fuse the others into one
token: their sum weighted by that attention (not normalised, as in the reference code).

Follows the reference code (youweiliang/evit ``evit.py``): same count rounding, kept tokens
in descending attention order, fused token last and treated as an ordinary token later.
Differences: all protected prefix tokens (not only [CLS]) are kept in front and excluded
from scoring; the [CLS] row is computed from Q and K instead of an eager attention map
(same values). ``keep_ratio`` picks the keep rate whose schedule meets the common budget.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.budget import mean_kept, solve_float
from ..core.errors import BudgetError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_bool, check_float, check_ints
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState


def default_locations(num_layers: int) -> tuple[int, ...]:
    """EViT's drop locations (3, 6, 9 of 12) scaled to the model's depth."""
    return tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)}))


def staged_counts(num_tokens: int, num_prefix: int, num_layers: int, locations, keep_rate: float, extra: int) -> list[int]:
    """Tokens each block's MLP sees when ``ceil(keep_rate * rest)`` are kept at ``locations``."""
    counts, n = [], num_tokens
    for layer in range(num_layers):
        if layer in locations:
            rest = n - num_prefix
            left = math.ceil(keep_rate * rest)
            if left < rest:
                n = num_prefix + left + extra
        counts.append(n)
    return counts


class StagedPruner(EncoderMethod):
    """Shared by the methods that prune at a few fixed blocks with a keep rate (EViT, random)."""

    fused = 0  # tokens added per stage (EViT's fused token)

    def __init__(self, keep_rate: float | None = None, keep_ratio: float | None = None, locations=None):
        super().__init__(keep_ratio)
        keep_rate = check_float(self.name, "keep_rate", keep_rate, min=0.0, max=1.0, min_open=True, optional=True,
                                error=BudgetError)
        self.locations = check_ints(self.name, "locations", locations, optional=True, why="0-based block indices")
        if keep_rate is not None and keep_ratio is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or keep_rate, not both")
        self.keep_rate = keep_rate if keep_rate is not None else (None if keep_ratio else 0.7)

    def describe(self) -> str:
        return f"keep_rate={self.keep_rate}" if self.budget is None else super().describe()

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        self._locs = self.locations if self.locations is not None else default_locations(info.num_layers)
        if self.budget is not None:
            counts = lambda k: mean_kept(staged_counts(num_tokens, info.num_prefix, info.num_layers, self._locs, k,
                                                       self.fused), num_tokens)
            self._rate = solve_float(counts, self.budget.ratio, 1e-3, 1.0)
        else:
            self._rate = self.keep_rate

    def wants_signals(self, layer: int) -> bool:
        return layer in self._locs

    def kept_count(self, n: int, num_prefix: int) -> int:
        return math.ceil(self._rate * (n - num_prefix))


@register
class EViT(StagedPruner):
    name = "evit"
    paper = "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"
    arxiv = "2202.07800"
    signals = ("cls_attn",)
    needs_cls = True
    fused = 1

    def __init__(self, keep_rate: float | None = None, keep_ratio: float | None = None, locations=None, fuse_token: bool = True):
        super().__init__(keep_rate, keep_ratio, locations)
        self.fuse_token = check_bool(self.name, "fuse_token", fuse_token)
        self.fused = 1 if fuse_token else 0

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        b, n, _ = x.shape
        p = tokens.num_prefix
        left = self.kept_count(n, p)
        if left >= n - p:
            return None
        cls_attn = signals["cls_attn"].mean(1)[:, p:]  # [B, N - p]: the [CLS] row, head-averaged
        if tokens.valid is not None:
            cls_attn = cls_attn.masked_fill(~tokens.valid[:, p:], -1.0)
        idx = cls_attn.topk(left, dim=1, largest=True, sorted=True).indices
        dest = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        dest[:, :p] = torch.arange(p, device=x.device)
        coef = torch.zeros(b, n, dtype=torch.float32, device=x.device)
        coef[:, :p] = 1.0
        dest.scatter_(1, p + idx, p + torch.arange(left, device=x.device).expand(b, left))
        coef.scatter_(1, p + idx, 1.0)
        num_out = p + left
        if self.fuse_token:
            dropped = dest[:, p:] < 0
            dest[:, p:] = torch.where(dropped, num_out, dest[:, p:])
            coef[:, p:] = torch.where(dropped, cls_attn.clamp_min(0).float(), coef[:, p:])
            num_out += 1
            return Reduction(num_out=num_out, dest=dest, coef=coef)
        return Reduction.keep(torch.cat([torch.arange(p, device=x.device).expand(b, p), p + idx], 1), n)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        return 2.0 * num_tokens * info.hidden_size if layer in self._locs else 0.0  # the [CLS] row of Q K^T
