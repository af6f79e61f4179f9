"""The running state of the tokens inside an encoder forward.

Sizes (how many input patches each token stands for — proportional attention adds their
log to the logits), validity (padding when samples keep different counts) and the source
map (the composed `Reduction` from the input: which patches each token covers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reduction import Reduction


@dataclass
class TokenState:
    sizes: Tensor  # [B, N] float
    num_prefix: int  # protected leading tokens, always kept in slots [0, num_prefix)
    valid: Tensor | None = None  # [B, N] bool, None = every token is real
    source: Reduction | None = None  # composed map from the encoder input (when tracked)
    track_source: bool = False
    history: list = field(default_factory=list)  # tokens entering each reduction point

    @staticmethod
    def start(x: Tensor, num_prefix: int, track_source: bool = False) -> "TokenState":
        b, n = x.shape[:2]
        sizes = torch.ones(b, n, dtype=torch.float32, device=x.device)
        src = Reduction.identity(b, n, device=x.device) if track_source else None
        return TokenState(sizes=sizes, num_prefix=num_prefix, source=src, track_source=track_source)

    @property
    def num_tokens(self) -> int:
        return self.sizes.shape[1]

    def counts(self) -> Tensor:
        """Real tokens per sample [B]."""
        if self.valid is None:
            return torch.full((self.sizes.shape[0],), self.num_tokens, device=self.sizes.device)
        return self.valid.sum(1)

    def apply(self, reduction: Reduction, x: Tensor) -> Tensor:
        """Reduce hidden states ``x`` and move sizes, validity and source map along."""
        out = reduction.apply(x)
        new_valid = reduction.valid(self.valid)
        self.sizes = reduction.sizes(self.sizes)
        self.valid = None if bool(new_valid.all()) else new_valid
        if self.track_source:
            self.source = self.source.then(reduction)
        return out

    def uniform_sizes(self) -> bool:
        """True until a merge gives some token a size other than 1 (then log-size bias matters)."""
        return bool((self.sizes == 1).all())

    def key_bias(self, prop_attn: bool, dtype) -> Tensor | None:
        """Additive attention bias over keys [B, 1, 1, N]: log(size) and -inf-like for padding."""
        if not prop_attn and self.valid is None:
            return None
        bias = torch.zeros_like(self.sizes, dtype=dtype)
        if prop_attn:
            bias = self.sizes.clamp_min(1e-6).log().to(dtype)  # log(0) guarded; padding is masked below
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, torch.finfo(dtype).min)
        return bias[:, None, None, :]
