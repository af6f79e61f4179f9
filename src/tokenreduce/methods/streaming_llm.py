"""StreamingLLM — Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023, arXiv 2309.17453).

Keep the first ``n_sink`` tokens (attention sinks: softmax dumps its spare mass on them,
whatever they say) and the most recent ones; evict the middle. Here, once after prefill:
each sample keeps its first ``n_sink`` real tokens and its last ``budget - n_sink``
(if the budget is at most ``n_sink``, its first ``budget`` tokens).

Differences from the paper and reference code (mit-han-lab/streaming-llm; kvpress
``StreamingLLMPress``): the paper evicts continuously while streaming and re-assigns
positions inside the cache (the kept tokens get positions 0..M-1, RoPE applied after the
cache); we compress once after prefill and kept keys keep their original rotary positions,
as kvpress's StreamingLLMPress does (kvpress needs its KeyRerotationPress for the paper's
re-positioning). In-cache re-positioning is not implemented.
"""

from __future__ import annotations

from torch import Tensor

from ..core.errors import BudgetError
from ..core.method import KVContext, KVMethod
from ..core.registry import register


@register
class StreamingLLM(KVMethod):
    name = "streaming_llm"
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023)"
    arxiv = "2309.17453"

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, n_sink: int = 4):
        super().__init__(keep_ratio, keep_count)
        if not isinstance(n_sink, int) or n_sink < 0:
            raise BudgetError(f"streaming_llm: n_sink is a number of leading tokens, an integer >= 0; got {n_sink!r}")
        self.n_sink = n_sink

    def describe(self) -> str:
        return f"{super().describe()}, n_sink={self.n_sink}"

    def score(self, ctx: KVContext) -> Tensor:
        n = ctx.rank.shape[1]
        rank = ctx.rank.float()
        # sinks first (earliest first), then recency
        s = (2 * n - rank).where(ctx.rank < self.n_sink, rank)
        return s[:, None, :]
