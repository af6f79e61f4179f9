"""TOVA — Transformers are Multi-State RNNs (Oren et al., 2024, arXiv 2401.06104).

Token Omission Via Attention: keep the entries the last query attends to most. The score of
an entry is the last query's softmax attention to it, averaged over all query heads of the
layer, so every head of a layer keeps the same tokens. Here it is applied once, after
prefill, to the whole prompt (the paper's policy applied at the step the prompt ends).

Differences from the reference code (schwartz-lab-NLP/TOVA ``tova_cache.py``): the row is
computed in the attention function from the post-RoPE last query and the cached keys (the
reference reads eager attention weights); budget as a ratio or count of the prompt instead
of a fixed cache size. As the reference (and unlike kvpress's TOVAPress, which always
keeps the last token), the last token competes with the others on its own attention score.
"""

from __future__ import annotations

from torch import Tensor

from ..core.method import DecoderInfo, KVContext, KVMethod
from ..core.registry import register


@register
class TOVA(KVMethod):
    name = "tova"
    paper = "Transformers are Multi-State RNNs (Oren et al., 2024)"
    arxiv = "2401.06104"
    signals = ("last_query_attn",)

    def query_rows(self, length: int) -> int:
        return 1

    def query_head_scores(self, ctx: KVContext) -> Tensor:
        """[B, H, N] the last query's attention per query head."""
        return ctx.window[:, :, -1, :]

    def score(self, ctx: KVContext) -> Tensor:
        return ctx.window[:, :, -1, :].mean(1, keepdim=True)  # [B, 1, N], the same for every KV head

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        return 2.0 * length * info.head_dim * info.num_heads + 5.0 * length * info.num_heads
