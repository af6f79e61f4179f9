"""Token Transforming — A Unified and Training-Free Token Compression Framework for Vision
Transformer Acceleration (Zeng, Yu, Kong, Tang, 2025, arXiv 2506.05709; precursor: M2M-TAG,
NeurIPS 2024 workshop "Machine Learning and Compression", openreview LO3Mw8Jrk0).

The paper writes every token reduction as an explicit matrix, X' = T X with T of shape M x N:
pruning builds one-to-one rows, merging many-to-one rows, and Token Transforming a many-to-many
T, in which one output draws on many inputs and one input may feed several outputs, which
keeps more information and works without training. Our encoder method, in every block after
the attention residual (ToMe's position): choose M target tokens, let every other token spread
itself over its ``k`` most similar targets (softmax of key cosine similarity / ``temperature``),
and make each output the size-weighted convex combination of what it receives. Protected
prefix tokens ([CLS], registers) are always targets, stay in front and are left unchanged.

Verified from the paper (abstract and Figure 1 caption only): the matrix view, the three
families (one-to-one, many-to-one, many-to-many), training-free use, the DeiT-S headline
(-40% FLOPs, x1.5, -0.1% top-1).

Differences from the reference: no reference code exists (the official repository
AuroraZengfh/TokenTransforming holds only a README), and the method section could not be
retrieved, so the following choices are ours:

* targets: ``criterion="similarity"`` (default) splits the patch tokens alternately (ToMe's
  bipartite split) and turns the ``r`` A-tokens most similar to some B-token into sources;
  ``"cls_attn"`` keeps the tokens the [CLS] row attends to most (head-averaged, EViT's signal);
* similarity: cosine of the keys averaged over heads (ToMe's metric);
* assignment: top-``k`` targets per source, softmax(sim / temperature) over them
  (``temperature=0``: one-hot argmax); targets keep only themselves unless
  ``spread_targets=True``; row i of T is size_j x P[j, i], normalised to sum 1;
* defaults ``criterion="similarity", k=2, temperature=0.02``, picked on DINOv2-S at
  keep_ratio 0.5 by [CLS] cosine to the full model on 7 bundled photos: similarity 0.989 vs
  cls_attn 0.947-0.980; k=2/T=0.02 0.989, k=1 0.989, k=4/T=0.1 0.982, k=8/T=0.2 0.969
  (wider spreading blurred more); spreading targets too 0.949;
* sizes: the core's dense rule (each source shares its size in proportion to its column of
  T, so the total is conserved); proportional attention on;
* budget: ToMe's constant ``r`` per block with ToMe's clamp (at most half the patch tokens
  per block); ``keep_ratio`` solves ``r`` like ToMe.

With ``k=1`` (or ``temperature=0``) the map is a hard many-to-one merge: each source joins its
most similar target (size-weighted average), the special case the tests check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.budget import Schedule, mean_kept, solve_integer, tome_schedule
from ..core.errors import StageError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_bool, check_choice, check_float, check_int, check_per_layer_r
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .tome import raise_budget, tome_counts

CRITERIA = ("similarity", "cls_attn")


def choose_targets(metric: Tensor, r: int, num_prefix: int, criterion: str, cls_scores: Tensor | None = None,
                   valid: Tensor | None = None) -> Tensor:
    """Indices [B, N - p - r] (ascending) of the patch tokens kept as targets.

    ``metric`` is L2-normalised [B, N, C]; ``cls_scores`` [B, N - p] is needed for "cls_attn".
    Padded tokens (``valid`` False) are never preferred as targets.
    """
    b, n, _ = metric.shape
    p = num_prefix
    rest = n - p
    is_target = torch.ones(b, rest, dtype=torch.bool, device=metric.device)
    if criterion == "cls_attn":
        score = cls_scores.to(torch.promote_types(cls_scores.dtype, torch.float32))
        if valid is not None:
            score = score.masked_fill(~valid[:, p:], -torch.inf)
        drop = score.topk(r, dim=1, largest=False).indices
    else:  # similarity: ToMe's alternating split; the A tokens closest to some B token become sources
        patches = metric[:, p:]
        a, bb = patches[:, ::2], patches[:, 1::2]
        score = (a @ bb.transpose(-1, -2))
        if valid is not None:
            score = score.masked_fill(~valid[:, p + 1::2][:, None, :], -torch.inf)
        score = score.max(-1).values
        if valid is not None:
            score = score.masked_fill(~valid[:, p::2], torch.inf)
        drop = score.topk(r, dim=1).indices * 2  # positions among the patch tokens
    is_target.scatter_(1, drop, False)
    return (~is_target).to(torch.int8).argsort(dim=1, stable=True)[:, : rest - r]


def transform_matrix(metric: Tensor, sizes: Tensor, num_prefix: int, targets: Tensor, k: int | None,
                     temperature: float, valid: Tensor | None = None, spread_targets: bool = False) -> Tensor:
    """The many-to-many map T [B, M, N], M = num_prefix + number of targets.

    Source j (a patch token) gives weight P[j, i] to each of its top-``k`` targets i (softmax of
    cosine similarity / temperature); a target keeps itself (P one-hot) unless
    ``spread_targets``; prefix tokens map to themselves. Row i of T is size_j * P[j, i]
    normalised to sum 1, so every output is a convex combination of inputs.
    """
    b, n, _ = metric.shape
    p, mt = num_prefix, targets.shape[1]
    m = p + mt
    metric = metric.to(torch.promote_types(metric.dtype, torch.float32))  # plan in >= fp32 under half models
    tgt_metric = metric[:, p:].gather(1, targets[..., None].expand(-1, -1, metric.shape[-1]))
    sim = metric[:, p:] @ tgt_metric.transpose(-1, -2)  # [B, N - p, Mt]
    if valid is not None:
        sim = sim.masked_fill(~valid[:, p:].gather(1, targets)[:, None, :], -torch.inf)
    kk = mt if k is None else min(k, mt)
    if temperature == 0 or kk == 1:
        top, idx = sim.topk(1, dim=-1)
        weight = torch.ones_like(top)
    else:
        top, idx = sim.topk(kk, dim=-1)
        weight = (top / temperature).softmax(-1)
    weight = torch.nan_to_num(weight, nan=0.0)  # a source with no valid target at all
    assign = torch.zeros_like(sim).scatter_(-1, idx, weight)  # P restricted to patch tokens [B, N - p, Mt]
    if not spread_targets:
        own = torch.full((b, n - p), -1, dtype=torch.long, device=metric.device)
        own.scatter_(1, targets, torch.arange(mt, device=metric.device).expand(b, mt))
        onehot = torch.nn.functional.one_hot(own.clamp_min(0), mt).to(assign.dtype)
        assign = torch.where((own >= 0)[..., None], onehot, assign)
    full = torch.zeros(b, n, m, dtype=assign.dtype, device=metric.device)
    if p:
        full[:, :p, :p] = torch.eye(p, dtype=assign.dtype, device=metric.device)
    full[:, p:, p:] = assign
    w = full.transpose(1, 2) * sizes[:, None, :].to(assign.dtype)  # [B, M, N]
    if valid is not None:
        w = w * valid[:, None, :].to(w.dtype)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


@register
class TokenTransforming(EncoderMethod):
    name = "token_transforming"
    paper = ("Token Transforming: A Unified and Training-Free Token Compression Framework for Vision "
             "Transformer Acceleration")
    arxiv = "2506.05709"
    signals = ("keys", "cls_attn")

    def __init__(self, r: int | list | tuple | None = None, keep_ratio: float | None = None, k: int | None = 2,
                 temperature: float = 0.02, criterion: str = "similarity", spread_targets: bool = False,
                 prop_attn: bool = True):
        super().__init__(keep_ratio)
        self.r = check_per_layer_r(self.name, "r", r)
        if (r is None) == (keep_ratio is None):
            raise_budget("token_transforming", "r", r, keep_ratio)
        self.k = check_int(self.name, "k", k, min=1, optional=True, why="targets per source; None = all targets")
        self.temperature = check_float(self.name, "temperature", temperature, min=0.0, why="0 = hard argmax")
        self.criterion = check_choice(self.name, "criterion", criterion, CRITERIA)
        self.spread_targets = check_bool(self.name, "spread_targets", spread_targets)
        self.prop_attn = check_bool(self.name, "prop_attn", prop_attn)
        self.schedule: Schedule | None = None
        self.signals = ("keys", "cls_attn") if criterion == "cls_attn" else ("keys",)

    def describe(self) -> str:
        budget = f"r={self.r}" if self.r is not None else super().describe()
        return f"{budget}, k={self.k}, temperature={self.temperature}, criterion={self.criterion}"

    def check(self, info: EncoderInfo) -> None:
        if self.criterion == "cls_attn" and not info.has_cls:
            raise StageError(f"token_transforming with criterion='cls_attn' picks targets by [CLS] attention, but "
                             f"{info.family} has no [CLS] token; use criterion='similarity' (the default)")

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        if self.r is not None:
            self.schedule = tome_schedule(info.num_layers, self.r)
            return
        def ratio(r):
            return mean_kept(tome_counts(num_tokens, info.num_prefix, tome_schedule(info.num_layers, r)), num_tokens)

        self.schedule = tome_schedule(info.num_layers, solve_integer(ratio, self.budget.ratio, 0, num_tokens // 2))

    def _removed(self, layer: int, n: int, num_prefix: int) -> int:
        return min(self.schedule.removed[layer], (n - num_prefix) // 2)

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        n, p = x.shape[1], tokens.num_prefix
        r = self._removed(layer, n, p)
        if r <= 0:
            return None
        with torch.no_grad():
            metric = signals["keys"].mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            cls = signals["cls_attn"].mean(1)[:, p:] if self.criterion == "cls_attn" else None
            targets = choose_targets(metric, r, p, self.criterion, cls, tokens.valid)
            t = transform_matrix(metric, tokens.sizes, p, targets, self.k, self.temperature, tokens.valid,
                                 self.spread_targets)
        return Reduction.dense(t)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        """Key mean and normalisation, target choice, N x M similarities, and applying T (2 M N C)."""
        n, p, c = num_tokens, info.num_prefix, info.hidden_size
        r = self._removed(layer, n, p)
        if r <= 0:
            return 0.0
        d, m = c // info.num_heads, n - r
        flops = n * c + 3.0 * n * d  # mean over heads, L2 normalisation
        if self.criterion == "cls_attn":
            flops += 2.0 * n * c  # the [CLS] row of Q K^T
        else:
            flops += 2.0 * ((n - p) / 2) ** 2 * d  # A @ B^T of the split
        flops += 2.0 * (n - p) * (m - p) * d  # similarity of every patch token to every target
        flops += 2.0 * m * n * c  # T @ X on the hidden states
        return flops
