"""Keyformer — KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference
(Adnan et al., 2024, arXiv 2403.09054).

H2O's accumulated-attention eviction with a different score: each query row contributes a
Gumbel-softmax of its logits, ``softmax((logits + G) / tau)`` with fresh standard Gumbel
noise ``G``, instead of the plain softmax. The noise regularises the scores of the tokens
that earlier evictions already skewed; the temperature ``tau`` rises linearly from
``tau_init`` (prompt) to ``tau_end`` over the generation, flattening the scores as the
cache ages. The cache keeps a fixed budget: the key tokens with the highest accumulated
score plus a recent window (``recent_fraction`` of the budget, default 0.3 = the
reference's ``recent=30`` % of ``kv_cache``); one entry is evicted per decoding step. The
model's own attention is untouched (the noise only scores).

Differences from the reference code (d-matrix-ai/keyformer-llm, ``GPTJAttention._attn``):

* The reference simulates eviction by masking; we evict (the cache shrinks), as our H2O.
* tau's horizon: the reference sets ``tau_delta = (tau_end - tau_init) / max_new_tokens``
  from its generation script; a method cannot see ``generate``'s arguments, so the horizon
  is the parameter ``max_new_tokens`` (default 128, the reference's summarisation setting)
  and tau stays at ``tau_end`` after it.
* Noise comes from a generator seeded with ``seed`` and reseeded at every compressed
  prefill (the reference draws from the global RNG): the same prompt gives the same cache.
  The noise is drawn per (sample, head, query, key) over the batch's padded layout, so a
  padded batch is not bit-equal to its samples run one at a time (it is a different draw).
* Per sample (the reference sums its scores over the batch) and GQA as our H2O (the
  reference models are multi-head): the query heads of a KV head average their scores.
* The reference's off-by-one (one old entry in neither the key nor the recent set) is not
  reproduced: the cache holds exactly the budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.params import check_float, check_int, check_seed
from ..core.registry import register
from .h2o import H2O


@register
class Keyformer(H2O):
    name = "keyformer"
    paper = "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference (Adnan et al., 2024)"
    arxiv = "2403.09054"
    signals = ("accumulated_attn",)  # its row_weights are Gumbel-softmax weights

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, recent_fraction: float = 0.3,
                 tau_init: float = 1.0, tau_end: float = 2.0, max_new_tokens: int = 128, seed: int = 0):
        super().__init__(keep_ratio, keep_count, recent_fraction)
        self.tau_init = check_float(self.name, "tau_init", tau_init, min=0.0, min_open=True,
                                    why="Gumbel-softmax temperatures are > 0")
        self.tau_end = check_float(self.name, "tau_end", tau_end, min=0.0, min_open=True,
                                   why="Gumbel-softmax temperatures are > 0")
        self.max_new_tokens = check_int(self.name, "max_new_tokens", max_new_tokens, min=1, why="tau's horizon")
        self.seed = check_seed(self.name, "seed", seed)
        self._generators: dict[str, torch.Generator] = {}

    def describe(self) -> str:
        return (f"{super().describe()}, tau_init={self.tau_init}, tau_end={self.tau_end}, "
                f"max_new_tokens={self.max_new_tokens}, seed={self.seed}")

    def tau(self, step: int) -> float:
        """Temperature at decoding step ``step`` (0 = the prompt)."""
        return self.tau_init + min(step, self.max_new_tokens) * (self.tau_end - self.tau_init) / self.max_new_tokens

    def begin_prefill(self) -> None:
        self._generators.clear()

    def gumbel(self, shape, device) -> Tensor:
        """Standard Gumbel(0, 1) noise from this method's seeded generator."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        u = torch.rand(shape, generator=self._generators[key], device=device, dtype=torch.float64)
        return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-16)))

    def accumulation_key(self) -> tuple:
        return (type(self).row_weights, self.seed, self.tau_init)  # the prompt's draws depend on these only

    def row_weights(self, logits: Tensor, step: int) -> Tensor:
        noise = self.gumbel(logits.shape, logits.device).to(logits.dtype)
        return ((logits + noise) / self.tau(step)).softmax(-1)
