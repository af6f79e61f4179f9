"""H2O — Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., 2023, arXiv 2306.14048).

A few "heavy hitter" tokens receive most of the attention. H2O scores every cached entry
by the attention it has accumulated, i.e. the softmax weights it received from every query
so far, summed, and keeps a fixed-size cache: the heaviest hitters plus a window of the
most recent tokens. At prefill the cache is cut to its budget from the prompt's full
attention; at every decoding step the new query's attention is added to the scores and
the cache is evicted back to the budget (one entry per step), so it never holds more than
``budget`` entries between steps (``budget + 1`` while a step attends).

Budget: ``keep_ratio`` of the prompt (or ``keep_count``) is the fixed cache size; a
``recent_fraction`` of it (default 0.5: the paper's equal heavy and recent ratios) is the
recent window, the rest heavy hitters.

Differences from the reference code (FMInference/H2O ``h2o_hf/utils_real_drop/modify_llama.py``,
``H2OKVCache_LayerWise``):

* The accumulated scores are computed from Q and K in chunks of query rows in the
  attention function (float32), not read from eager attention weights: the model keeps
  its SDPA attention. The cost (one more Q K^T at prefill) is in ``stats.scoring_flops``.
* The reference sums the scores over the batch (one kept set for every sample); we keep
  one set per sample (and left padding adds nothing), so a batch equals its samples one
  at a time.
* GQA (the reference has none): the accumulated scores of a KV head's query heads are
  averaged, then each KV head keeps its own entries. Scores are held per query head.
* The budget is a ratio or count of the prompt, fixed at prefill, as the reference's
  ``heavy_ratio``/``recent_ratio`` times the prompt length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.method import DecoderInfo, EvictionContext, KVContext, KVMethod
from ..core.params import check_float
from ..core.registry import register


def group_mean(scores: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, H, N]`` per query head -> ``[B, H_kv, N]``: the mean over each KV head's query heads."""
    b, h, n = scores.shape
    return scores.reshape(b, num_kv_heads, h // num_kv_heads, n).mean(2)


@register
class H2O(KVMethod):
    name = "h2o"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (Zhang et al., 2023)"
    arxiv = "2306.14048"
    signals = ("accumulated_attn",)
    evicts_during_decode = True

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, recent_fraction: float = 0.5):
        super().__init__(keep_ratio, keep_count)
        self.recent_fraction = check_float(self.name, "recent_fraction", recent_fraction, min=0.0, max=1.0,
                                           why="the share of the budget kept for the most recent tokens")

    def describe(self) -> str:
        return f"{super().describe()}, recent_fraction={self.recent_fraction}"

    def recent(self, budgets: Tensor) -> Tensor:
        """Recent-window size per sample [B]."""
        return torch.floor(budgets.to(torch.float64) * self.recent_fraction + 1e-9).to(torch.long)

    def query_head_scores(self, ctx: KVContext) -> Tensor:
        """[B, H, N] accumulated attention per query head."""
        return ctx.accumulated

    def score(self, ctx: KVContext) -> Tensor:
        heavy = group_mean(ctx.accumulated, ctx.keys.shape[1])
        recent = (ctx.lengths - self.recent(ctx.budgets)).to(ctx.rank.device)
        return torch.where((ctx.rank >= recent[:, None])[:, None, :], float("inf"), heavy)

    def evict_score(self, ctx: EvictionContext) -> Tensor:
        heavy = group_mean(ctx.state, ctx.age.shape[1])
        recent = self.recent(ctx.budgets).to(ctx.age.device)
        return torch.where(ctx.age < recent[:, None, None], float("inf"), heavy)

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        """Every row's Q K^T again (causal half) plus softmax: the price of not switching to eager attention."""
        return (2.0 * info.head_dim + 5.0) * info.num_heads * length * (length + 1) / 2
