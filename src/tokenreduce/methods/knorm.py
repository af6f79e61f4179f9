"""Key norm — A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al., 2024, arXiv 2406.11430).

Keys with a low L2 norm tend to receive high attention, so keep, per KV head, the entries
whose key has the lowest norm. No attention is needed (works with any kernel). The norm of
a rotated key equals that of the unrotated one (RoPE is a rotation), so the cached keys
serve.

Differences from the reference code (alessiodevoto/l2compress ``cache.py``): the budget is
``floor(keep_ratio * n)`` as for every kv method here (the reference takes the ``ceil``);
the reference only compresses prompts longer than ``prune_after`` (2048) tokens and skips
some layers in its scripts (``skip_layers``: 0, or 0 and 1); here every full-attention
layer is compressed unless ``skip_layers`` names some (kvpress's KnormPress compresses
all). Layers of different lengths need the attachment to build each layer's mask, so such
a cache is decoded inside ``tokenreduce.apply``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import StageError
from ..core.method import DecoderInfo, KVContext, KVMethod
from ..core.params import check_ints
from ..core.registry import register


@register
class KeyNorm(KVMethod):
    name = "knorm"
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al., 2024)"
    arxiv = "2406.11430"
    signals = ("keys",)

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, skip_layers=()):
        super().__init__(keep_ratio, keep_count)
        self.skip_layers = check_ints(self.name, "skip_layers", skip_layers, why="0-based layer indices")

    def describe(self) -> str:
        return super().describe() + (f", skip_layers={self.skip_layers}" if self.skip_layers else "")

    def check(self, info: DecoderInfo) -> None:
        bad = [i for i in self.skip_layers if not 0 <= i < info.num_layers]
        if bad:
            raise StageError(f"knorm: skip_layers {bad} are outside the model's {info.num_layers} layers")

    def compresses(self, layer: int) -> bool:
        return layer not in self.skip_layers

    def score(self, ctx: KVContext) -> Tensor:
        return -ctx.keys.to(torch.promote_types(ctx.keys.dtype, torch.float32)).norm(dim=-1)  # [B, H_kv, N]

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        return 2.0 * length * info.head_dim * info.num_kv_heads
