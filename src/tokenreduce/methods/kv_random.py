"""Random KV-cache eviction — the baseline every kv-cache table needs (no paper; kvpress ``RandomPress``).

Each sample keeps a uniformly random subset of its context entries, independently per
layer and KV head. Seeded: the draws depend only on (seed, layer) and the sample's own
real entries, so a sample keeps the same entries alone or in a padded batch. Registered as
``kv_random`` (``random`` is the encoder-stage baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.method import KVContext, KVMethod
from ..core.params import check_seed
from ..core.registry import register


@register
class RandomKV(KVMethod):
    name = "kv_random"
    paper = "baseline: uniformly random KV-cache eviction"
    arxiv = None

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, seed: int = 0):
        super().__init__(keep_ratio, keep_count)
        self.seed = check_seed(self.name, "seed", seed)

    def describe(self) -> str:
        return f"{super().describe()}, seed={self.seed}"

    def score(self, ctx: KVContext) -> Tensor:
        b, h, n, _ = ctx.keys.shape
        scores = torch.zeros(b, h, n, dtype=torch.float32)
        valid = ctx.valid.cpu()
        for i in range(b):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer)
            m = int(valid[i].sum())
            scores[i][:, valid[i]] = torch.rand(h, m, generator=g)
        return scores.to(ctx.keys.device)
