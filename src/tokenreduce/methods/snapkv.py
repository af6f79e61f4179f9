"""SnapKV — LLM Knows What You are Looking for Before Generation (Li et al., 2024, arXiv 2404.14469).

At the end of prefill, the last ``window_size`` queries of the prompt (the observation
window) already attend to what generation will need. Per layer, SnapKV averages their
softmax attention over the prefix keys, smooths it along the sequence with a 1-D pooling
(``kernel_size``, avg or max, zero padding) so that neighbours of a hit survive with it,
keeps the top entries per KV head and always keeps the window itself. The budget counts the
window (``keep`` entries in all, the window included).

GQA (as kvpress and the SnapKV authors' answer in FasterDecoding/SnapKV#22): the pooled
scores of the query heads that share a KV head are averaged, then top-k per KV head — so
the cache stays ``[B, H_kv, M, D]``, every head its own tokens, no padding.

Differences from the reference code (FasterDecoding/SnapKV ``snapkv_utils.py``; kvpress
``SnapKVPress``):

* The window rows are computed in the attention function from the post-RoPE queries the
  model already made (no eager attention, no re-projection as kvpress does from hidden
  states); the softmax is over the prefix and the causal window, in float32, as both.
* Mean over the window rows (kvpress) instead of the sum (reference): the same ranking.
* The reference skips prompts shorter than its capacity and needs capacity > window; we
  compress any prompt: the window is ``min(window_size, n - 1)`` queries and, if the budget
  is smaller than the window, the most recent entries are kept (kvpress leaves that tie to
  ``topk``). The reference has no GQA (per-query-head caches); see above.
* Defaults ``window_size=32, kernel_size=5, pooling="avgpool"`` are the reference's
  ``init_snapkv`` defaults (its LongBench ablations use kernel 7, maxpool); kvpress uses a
  64-query window — pass ``window_size=64`` to compare with it.
* Kept entries are stored in their original order (the reference puts the top-k in score
  order before the window); attention does not depend on the order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.method import DecoderInfo, KVContext, KVMethod
from ..core.params import check_choice, check_int
from ..core.registry import register


@register
class SnapKV(KVMethod):
    name = "snapkv"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024)"
    arxiv = "2404.14469"
    signals = ("window_attn",)

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, window_size: int = 32,
                 kernel_size: int = 5, pooling: str = "avgpool"):
        super().__init__(keep_ratio, keep_count)
        self.window_size = check_int(self.name, "window_size", window_size, min=1, why="observation queries")
        self.kernel_size = check_int(self.name, "kernel_size", kernel_size, min=1, odd=True,
                                     why="pooling keeps the length")
        self.pooling = check_choice(self.name, "pooling", pooling, ("avgpool", "maxpool"))

    def describe(self) -> str:
        return f"{super().describe()}, window_size={self.window_size}, kernel_size={self.kernel_size}, pooling={self.pooling}"

    def query_rows(self, length: int) -> int:
        return max(0, min(self.window_size, length - 1))

    def window(self, ctx: KVContext) -> Tensor:
        """[B, N] the observation window of each sample (its last ``window_rows`` real entries): always kept."""
        rows = ctx.window_rows.to(ctx.rank.device)
        return ctx.valid & (ctx.rank >= (ctx.lengths.to(ctx.rank.device) - rows)[:, None])

    def query_head_scores(self, ctx: KVContext) -> Tensor:
        """[B, H, N] the window's mean attention to each prefix entry, pooled along the sequence, per query head."""
        probs, rows = ctx.window, ctx.window_rows.to(ctx.keys.device)
        b, h, w, n = probs.shape
        mine = torch.arange(w, device=probs.device)[None, :] >= (w - rows)[:, None]  # [B, W] the sample's window rows
        mean = torch.where(mine[:, None, :, None], probs, 0.0).sum(2) / rows.clamp_min(1)[:, None, None]  # [B, H, N]
        prefix = ctx.valid & ~self.window(ctx)
        mean = torch.where(prefix[:, None, :], mean, 0.0)
        pad = self.kernel_size // 2
        if self.pooling == "avgpool":
            return F.avg_pool1d(mean, self.kernel_size, stride=1, padding=pad)
        return F.max_pool1d(mean, self.kernel_size, stride=1, padding=pad)

    def score(self, ctx: KVContext) -> Tensor:
        pooled = self.query_head_scores(ctx)
        b, h, n = pooled.shape
        hk = ctx.keys.shape[1]
        pooled = pooled.reshape(b, hk, h // hk, n).mean(2)  # GQA: average the group's query heads
        return torch.where(self.window(ctx)[:, None, :], float("inf"), pooled)

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        """The window rows' Q K^T (the model's prefill does the rest) plus softmax and pooling."""
        return 2.0 * rows * length * info.head_dim * info.num_heads + 5.0 * rows * length * info.num_heads \
            + self.kernel_size * length * info.num_heads
