"""What the last forward kept and what that bought: tokens per block and analytic FLOPs.

FLOPs count multiply-adds as 2 and follow the tensors actually computed: when samples keep
different counts and are padded, the padded length is what the block paid for, so that is
what is counted (``tokens_per_layer`` reports the mean count of real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def vit_attention_flops(n: float, hidden: int) -> float:
    """QKV and output projections plus the two N x N attention products, one image."""
    return 2 * n * hidden * 3 * hidden + 2 * 2 * n * n * hidden + 2 * n * hidden * hidden


def vit_mlp_flops(n: float, hidden: int, mlp: int) -> float:
    return 2 * 2 * n * hidden * mlp


@dataclass
class Stats:
    tokens_per_layer: list[float] = field(default_factory=list)  # real tokens entering each block (mean over batch)
    mlp_tokens_per_layer: list[float] = field(default_factory=list)  # real tokens each block's MLP saw
    flops: float = 0.0  # analytic FLOPs of the reduced forward, per sample (stages we attach to)
    flops_full: float = 0.0  # the same model without reduction
    scoring_flops: float = 0.0  # the methods' own scoring/planning work, per sample (counted in `flops`)
    batch_size: int = 0

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 1.0

    @property
    def final_tokens(self) -> float:
        return self.mlp_tokens_per_layer[-1] if self.mlp_tokens_per_layer else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens_per_layer": self.tokens_per_layer,
            "mlp_tokens_per_layer": self.mlp_tokens_per_layer,
            "flops": self.flops,
            "flops_full": self.flops_full,
            "flops_ratio": self.flops_ratio,
            "scoring_flops": self.scoring_flops,
            "batch_size": self.batch_size,
        }
