"""StreamingLLM — Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023, arXiv 2309.17453).

Keep the first ``n_sink`` tokens (attention sinks: softmax dumps its spare mass on them,
whatever they say) and the most recent ones; evict the middle. Here, once after prefill:
each sample keeps its first ``n_sink`` real tokens and its last ``budget - n_sink``
(if the budget is at most ``n_sink``, its first ``budget`` tokens).

Two modes:

* ``rolling=False`` (default, as kvpress's ``StreamingLLMPress``): compress once after
  prefill; kept keys keep their original rotary positions; the cache then grows.
* ``rolling=True`` (the paper's rolling KV cache, Sec. 3.2): the cache never holds more
  than its budget — after every decoding step the oldest non-sink entry goes — and
  positions are those *within the cache*: the kept entries are at 0..M-1 and a new token
  at M, whatever their place in the text. The paper caches keys before RoPE and rotates
  them at every step; we keep rotated keys and re-rotate only the ones whose in-cache
  position changes (by the difference, in float64) — the same keys up to rounding. The
  attachment lowers the positions of new tokens by the number of entries evicted so far,
  so it must stay attached while decoding (a rolling cache used outside ``apply``
  raises). It needs the whole prompt in one forward, a static RoPE and no sliding-window
  layers (the shift applies to every layer).

Differences from the reference code (mit-han-lab/streaming-llm ``enable_streaming_llm`` /
``pos_shift``): we start from a compressed prompt (the reference streams the prompt through
a fixed-size cache too, ``start_size + recent_size``); budgets as a ratio or count of the
prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.method import EvictionContext, KVContext, KVMethod
from ..core.params import check_bool, check_int
from ..core.registry import register


@register
class StreamingLLM(KVMethod):
    name = "streaming_llm"
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023)"
    arxiv = "2309.17453"

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, n_sink: int = 4,
                 rolling: bool = False):
        super().__init__(keep_ratio, keep_count)
        self.n_sink = check_int(self.name, "n_sink", n_sink, min=0, why="leading tokens always kept")
        self.rolling = check_bool(self.name, "rolling", rolling)
        self.evicts_during_decode = self.repositions = self.rolling

    def describe(self) -> str:
        return f"{super().describe()}, n_sink={self.n_sink}" + (", rolling=True" if self.rolling else "")

    def cache_positions(self, real: Tensor) -> Tensor:
        """Sec. 3.2, positions within the cache: the kept entries at 0..M-1, in text order (a new token then at M)."""
        return real.long().cumsum(-1) - 1

    def evict_score(self, ctx: EvictionContext) -> Tensor:
        """Sinks (the first ``n_sink`` real slots) first, then the newest entries."""
        rank = (ctx.valid.long().cumsum(-1) - 1)[:, None, :]  # slots are in text order
        age = ctx.age.to(torch.float64)
        return torch.where(rank < self.n_sink, float("inf"), -age)

    def score(self, ctx: KVContext) -> Tensor:
        n = ctx.rank.shape[1]
        rank = ctx.rank.float()
        # sinks first (earliest first), then recency
        s = (2 * n - rank).where(ctx.rank < self.n_sink, rank)
        return s[:, None, :]
