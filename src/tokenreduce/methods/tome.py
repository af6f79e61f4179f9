"""ToMe — Token Merging: Your ViT But Faster (Bolya et al., ICLR 2023, arXiv 2210.09461).

In every block, after the attention residual and before the MLP, merge ``r`` tokens by
bipartite soft matching: split tokens alternately into sets A (even) and B (odd), match
each A token to its most similar B token by cosine similarity of the keys (averaged over
heads), merge the ``r`` most similar edges by a size-weighted average, and keep the rest.
The [CLS] token is never merged. With proportional attention, ``log(size)`` is added to
the attention logits so a merged token weighs as much as the tokens it stands for.

Follows the reference code (facebookresearch/ToMe ``merge.py``/``patch/timm.py``): same
split, same -inf protection, same ``r <= (t - protected) // 2`` clamp, same output order
([CLS] and unmerged A tokens sorted by index, then B tokens), same ``parse_r`` inflection.
DeiT's distillation token is protected and output second, as ToMe does. Differences: more
protected tokens (DINOv2 registers) are protected the same way and kept at the front
(ToMe has no registers); LayerScale is kept (ToMe's timm patch predates it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.budget import Schedule, mean_kept, solve_integer, tome_schedule
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_bool, check_per_layer_r
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState


def bipartite_scores(metric: Tensor, num_prefix: int, valid: Tensor | None = None) -> Tensor:
    """Cosine similarity of every A token (even index) to every B token (odd) [B, Na, Nb].

    Edges from or to a protected token, or (``valid`` [B, N] given) a padded one, are -inf.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = protect_prefix(metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2), num_prefix)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, ::2, None] | ~valid[:, None, 1::2], -math.inf)
    return scores


def protect_prefix(scores: Tensor, num_prefix: int) -> Tensor:
    """Set every edge from or to a protected token to -inf, in place (A = even, B = odd tokens)."""
    na, nb = scores.shape[-2], scores.shape[-1]
    scores[..., torch.arange(na, device=scores.device) * 2 < num_prefix, :] = -math.inf
    scores[..., torch.arange(nb, device=scores.device) * 2 + 1 < num_prefix] = -math.inf
    return scores


def best_edges(scores: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's edge choice on A x B ``scores``: (unmerged A, merged A, their B destinations).

    The ``r`` A tokens whose best edge is strongest merge into their best B token; unmerged
    A tokens are sorted by index when a prefix is protected (so [CLS] stays first), else
    left in descending-score order, as in ToMe.
    """
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if num_prefix > 0:
        unm_idx = unm_idx.sort(dim=1).values
    return unm_idx, src_idx, node_idx.gather(1, src_idx)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, int]:
    """ToMe's matching as destinations: (dest [B, N], num_out). ``metric`` is [B, N, C]."""
    b, n, _ = metric.shape
    scores = bipartite_scores(metric, num_prefix)
    na, nb = scores.shape[1], scores.shape[2]
    unm_idx, src_idx, dst_idx = best_edges(scores, r, num_prefix)
    n_unm = na - r

    a_dest = torch.empty(b, na, dtype=torch.long, device=metric.device)
    a_dest.scatter_(1, unm_idx, torch.arange(n_unm, device=metric.device).expand(b, n_unm))
    a_dest.scatter_(1, src_idx, n_unm + dst_idx)
    b_dest = (n_unm + torch.arange(nb, device=metric.device)).expand(b, nb)
    dest = torch.empty(b, n, dtype=torch.long, device=metric.device)
    dest[:, ::2], dest[:, 1::2] = a_dest, b_dest
    if num_prefix > 1:
        dest = _prefix_first(dest, num_prefix, n_unm + nb)
    return dest, n_unm + nb


def _prefix_first(dest: Tensor, num_prefix: int, num_out: int) -> Tensor:
    """Renumber output slots so the protected tokens' slots come first, in token order."""
    b = dest.shape[0]
    key = torch.arange(num_out, device=dest.device).expand(b, num_out).clone() + num_prefix
    key.scatter_(1, dest[:, :num_prefix], torch.arange(num_prefix, device=dest.device).expand(b, num_prefix))
    rank = key.argsort(1).argsort(1)
    return rank.gather(1, dest)


def tome_counts(num_tokens: int, num_prefix: int, schedule: Schedule) -> list[int]:
    """Tokens each block's MLP sees under ``schedule`` (with ToMe's clamp)."""
    counts, n = [], num_tokens
    for r in schedule.removed:
        n -= min(r, (n - num_prefix) // 2)
        counts.append(n)
    return counts


@register
class ToMe(EncoderMethod):
    name = "tome"
    paper = "Token Merging: Your ViT But Faster"
    arxiv = "2210.09461"
    signals = ("keys",)

    def __init__(self, r: int | list | tuple | None = None, keep_ratio: float | None = None, prop_attn: bool = True):
        super().__init__(keep_ratio)
        self.r = check_per_layer_r(self.name, "r", r)
        self.prop_attn = check_bool(self.name, "prop_attn", prop_attn)
        if (r is None) == (keep_ratio is None):
            raise_budget("tome", "r", r, keep_ratio)
        self.schedule: Schedule | None = None

    def describe(self) -> str:
        return f"r={self.r}" if self.r is not None else super().describe()

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        if self.r is not None:
            self.schedule = tome_schedule(info.num_layers, self.r)
            return
        ratio = lambda r: mean_kept(tome_counts(num_tokens, info.num_prefix, tome_schedule(info.num_layers, r)), num_tokens)
        self.schedule = tome_schedule(info.num_layers, solve_integer(ratio, self.budget.ratio, 0, num_tokens // 2))

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        n, p = x.shape[1], tokens.num_prefix
        r = min(self.schedule.removed[layer], (n - p) // 2)
        if r <= 0:
            return None
        with torch.no_grad():
            dest, num_out = bipartite_soft_matching(signals["keys"].mean(1), r, p)
        return Reduction.merge(dest, num_out, tokens.sizes)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        return matching_flops(num_tokens, info)


def matching_flops(num_tokens: int, info: EncoderInfo) -> float:
    """FLOPs of one bipartite matching over head-averaged keys (batch of one)."""
    d = info.hidden_size // info.num_heads
    return 2.0 * (num_tokens / 2) ** 2 * d + 3.0 * num_tokens * d  # A @ B^T, normalisation


def raise_budget(method: str, native: str, native_value, keep_ratio):
    from ..core.errors import BudgetError

    if native_value is None and keep_ratio is None:
        raise BudgetError(f"{method} needs a budget: keep_ratio=<float in (0, 1]> or its native {native}=...")
    raise BudgetError(f"{method}: give keep_ratio or {native}, not both (got keep_ratio={keep_ratio}, {native}={native_value})")
