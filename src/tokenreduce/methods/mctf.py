"""MCTF — Multi-criteria Token Fusion with One-step-ahead Attention (Lee et al., CVPR 2024, arXiv 2403.10030).

At each active block (default every block but the first) fuse ``r`` tokens of the block's
input by bidirectional bipartite matching over a score that multiplies three criteria:
similarity (cosine of the residual-stream tokens), informativeness (inverse attention a
token receives) and size (inverse token size), each tempered by ``1/tau``. Tokens are
fused by an attention-times-size weighted average. With one-step-ahead attention (the
default) the scores use *this* block's attention, computed on the unfused tokens, and the
block then attends with that map fused the same way (keys summed, queries averaged) over
values of the fused tokens — no second softmax.

Follows the reference code (mlvlab/MCTF ``utils/mctf.py``, ``Block_DEIT``, ``MHSA``) in the
training-free setting with its defaults (tau_sim=1, tau_info=20, tau_size=40, bidirectional,
one-step-ahead 1, prop_attn, pooling_type 1, r per active block, ``t - r < 10`` guard, r as a
fraction of ``t - protected`` when < 1): same A/B split, same step order (A->B by argsort,
then B->remaining A on the original scores), same output order ([CLS] and unmerged A tokens
by index, then the remaining B tokens in descending step-2 score), same weights.

Differences from the reference code:

* Several protected tokens (DINOv2 registers, DeiT's distillation token) are protected on
  both sides of the split and kept in front, in token order (the reference masks the first
  ``num_protected`` rows of set A, which is only right for one protected token).
* When the guard makes ``r`` negative (fewer than 10 tokens left) nothing is fused (the
  reference would pass a negative ``r`` on).
* Pooling "max" (pooling_type 2) is not offered: it is not a linear map of the tokens.
* ``one_step_ahead=0`` fuses after block ``l``'s MLP with block ``l``'s attention, as the
  reference does, but implemented as a fusion of block ``l+1``'s input; the fusion after the
  last block (which only merges output patch tokens, [CLS] untouched) is skipped.
* Attention runs through the model's own modules: the probe of a one-step-ahead block
  computes Q, K and V of the unfused tokens and the block then projects Q, K and V of the
  fused ones (the reference computes Q, K once and V once). Both are counted in ``stats``.
* ``keep_ratio`` picks the integer ``r`` whose token schedule meets the common budget.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.budget import mean_kept, solve_integer
from ..core.errors import BudgetError, StageError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_bool, check_choice, check_float, check_ints, fail, is_int, is_real
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .tome import _prefix_first, best_edges, protect_prefix, raise_budget

POOLINGS = {"attention": 1, "size": 0, "mean": 3}  # name -> reference pooling_type


def fused_count(r: float, t: int, num_prefix: int) -> int:
    """Tokens the reference fuses at a block holding ``t`` tokens (its guard and clamp)."""
    if t - r < 10:
        r = t - 10
    if r <= 0:
        return 0
    r = int((t - num_prefix) * r) if r < 1 else int(r)
    return max(0, min(r, (t - num_prefix) // 2))


def mctf_counts(num_tokens: int, num_prefix: int, num_layers: int, layers, r: float, one_step_ahead: int) -> list[int]:
    """Tokens each block's MLP sees (fusion before the block's attention, or after its MLP for mode 0)."""
    counts, n = [], num_tokens
    for layer in range(num_layers):
        if one_step_ahead and layer in layers:
            n -= fused_count(r, n, num_prefix)
        counts.append(n)
        if not one_step_ahead and layer in layers:
            n -= fused_count(r, n, num_prefix)
    return counts


def mctf_scores(x: Tensor, attn: Tensor | None, sizes: Tensor, tau_sim: float, tau_info: float, tau_size: float) -> Tensor:
    """The multi-criteria score between set A (even tokens) and set B (odd tokens), [B, |A|, |B|]."""
    m = x / x.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    if tau_sim:
        score = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        score = torch.ones(a.shape[0], a.shape[1], b.shape[1], dtype=x.dtype, device=x.device)
    if tau_info > 0 and attn is not None:
        info = 1 / attn.mean(dim=(1, 2))  # inverse attention received, [B, N]
        info = info / info.max(1, keepdim=True).values
        score = score * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size:
        s = 1 / sizes
        s = s / s.max(1, keepdim=True).values
        score = score * (s[:, ::2, None] * s[:, None, 1::2]).to(score.dtype) ** (1 / tau_size)
    return score


def bidirectional_matching(scores: Tensor, r: int, num_prefix: int, bidirectional: bool = True) -> tuple[Tensor, int]:
    """MCTF's two-step bipartite matching as destinations: (dest [B, N], num_out).

    Step 1 sends the ``r // 2`` best A tokens to their best B token; step 2 sends the
    ``r - r // 2`` best B tokens (already holding their A sources) to their best remaining
    A token, on the same scores. Slots: unmerged A tokens by index, then the remaining B
    tokens in descending step-2 score (protected tokens renumbered to the front).
    """
    scores = scores.clone()
    bsz, na, nb = scores.shape
    n, dev = na + nb, scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    b_tok = torch.arange(nb, device=dev) * 2 + 1
    unm_idx, src_idx, dst_idx = best_edges(protect_prefix(scores, num_prefix), r1, num_prefix)
    n_unm = na - r1

    b_dest = torch.empty(bsz, nb, dtype=torch.long, device=dev)
    if bidirectional:
        scores2 = scores.gather(1, unm_idx[..., None].expand(bsz, n_unm, nb)).transpose(1, 2)  # [B, |B|, |A unm|]
        scores2[:, b_tok < num_prefix, :] = -math.inf
        node_max2, node_idx2 = scores2.max(dim=-1)
        edge_idx2 = node_max2.sort(dim=-1, descending=True).indices
        unm_idx2, src_idx2 = edge_idx2[:, r2:], edge_idx2[:, :r2]
        b_dest.scatter_(1, unm_idx2, (n_unm + torch.arange(nb - r2, device=dev)).expand(bsz, nb - r2))
        b_dest.scatter_(1, src_idx2, node_idx2.gather(1, src_idx2))
    else:
        b_dest[:] = n_unm + torch.arange(nb, device=dev)
    a_dest = torch.empty(bsz, na, dtype=torch.long, device=dev)
    a_dest.scatter_(1, unm_idx, torch.arange(n_unm, device=dev).expand(bsz, n_unm))
    a_dest.scatter_(1, src_idx, b_dest.gather(1, dst_idx))
    dest = torch.empty(bsz, n, dtype=torch.long, device=dev)
    dest[:, ::2], dest[:, 1::2] = a_dest, b_dest
    num_out = n - r1 - r2
    if num_prefix > 1:
        dest = _prefix_first(dest, num_prefix, num_out)
    return dest, num_out


def fused_attention(attn: Tensor, dest: Tensor, num_out: int, rows: Reduction) -> Tensor:
    """The attention map over fused tokens [B, H, M, M]: keys summed, queries averaged by ``rows``."""
    keys = Reduction(num_out=num_out, dest=dest, coef=torch.ones_like(dest, dtype=attn.dtype))
    by_key = keys.apply(attn.transpose(-1, -2)).transpose(-1, -2)  # [B, H, N, M]
    return rows.apply(by_key)


def mctf_step(x: Tensor, attn: Tensor, sizes: Tensor, r: int, num_prefix: int, tau_sim: float = 1.0,
              tau_info: float = 20.0, tau_size: float = 40.0, bidirectional: bool = True,
              pooling: str = "attention") -> tuple[Reduction, Tensor]:
    """One MCTF fusion of tokens ``x`` [B, N, C] given the attention ``attn`` [B, H, N, N] over them.

    Returns the `Reduction` (weighted fusion) and the fused attention [B, H, M, M].
    """
    with torch.no_grad():  # the plan; the fusion weights and the fused attention stay differentiable
        scores = mctf_scores(x, attn, sizes, tau_sim, tau_info, tau_size)
        dest, num_out = bidirectional_matching(scores, r, num_prefix, bidirectional)
    if pooling == "attention":
        red = Reduction.merge(dest, num_out, sizes, weights=attn.mean(dim=(1, 2)).to(sizes.dtype))
    elif pooling == "size":
        red = Reduction.merge(dest, num_out, sizes)
    else:  # mean
        red = Reduction.merge(dest, num_out, torch.ones_like(sizes))
    return red, fused_attention(attn, dest, num_out, red)


@register
class MCTF(EncoderMethod):
    name = "mctf"
    paper = "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers"
    arxiv = "2403.10030"
    signals = ("attn",)
    runs_alone = True  # its fused attention map replaces the next block's attention

    def __init__(self, r: int | float | None = None, keep_ratio: float | None = None, tau_sim: float = 1.0,
                 tau_info: float = 20.0, tau_size: float = 40.0, bidirectional: bool = True, one_step_ahead: int = 1,
                 layers=None, pooling: str = "attention", prop_attn: bool = True):
        super().__init__(keep_ratio)
        if r is not None and not ((is_int(r) and r >= 0) or (is_real(r) and 0 < r < 1)):
            fail(self.name, "r", "an integer >= 0 (tokens fused per active block), a fraction in (0, 1) of the "
                 "unprotected tokens, or None", r, BudgetError)
        if (r is None) == (keep_ratio is None):
            raise_budget("mctf", "r", r, keep_ratio)
        self.one_step_ahead = check_choice(self.name, "one_step_ahead", one_step_ahead, (0, 1, 2),
                                           why="0 off, 1 approximate [default], 2 precise")
        self.pooling = check_choice(self.name, "pooling", pooling, sorted(POOLINGS), why="'max' is not a linear map")
        self.taus = tuple(check_float(self.name, name, tau, min=0.0, why="0 turns the criterion off")
                          for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)))
        self.r = int(r) if is_int(r) else r
        self.bidirectional = check_bool(self.name, "bidirectional", bidirectional)
        self.layers = check_ints(self.name, "layers", layers, optional=True, why="0-based block indices")
        self.prop_attn = check_bool(self.name, "prop_attn", prop_attn)

    def describe(self) -> str:
        return f"r={self.r}" if self.r is not None else super().describe()

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        self._layers = set(self.layers if self.layers is not None else range(1, info.num_layers))
        self._num_layers = info.num_layers
        self._attn = None
        if self.r is not None:
            self._r = self.r
            return
        ratio = lambda r: mean_kept(mctf_counts(num_tokens, info.num_prefix, info.num_layers, self._layers, r,
                                                self.one_step_ahead), num_tokens)
        self._r = solve_integer(ratio, self.budget.ratio, 0, num_tokens)

    # ---------------------------------------------------------------- where it runs
    def _fuses_before(self, layer: int) -> bool:
        if self.one_step_ahead:
            return layer in self._layers
        return layer - 1 in self._layers  # mode 0: after block layer-1's MLP

    def reduces_before_attention(self, layer: int) -> bool:
        return self._fuses_before(layer)

    def wants_signals(self, layer: int) -> bool:
        # mode 0 keeps block l's attention for the fusion after its MLP (the last block's is never used)
        return not self.one_step_ahead and layer in self._layers and layer < self._num_layers - 1

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> None:
        self._attn = signals["attn"]
        return None

    def reduce_before_attention(self, layer: int, x: Tensor, tokens: TokenState, probe):
        if tokens.valid is not None:
            raise StageError("mctf fuses the same number of tokens in every sample and cannot follow a method that "
                             "pads samples to different counts; attach it alone or before that method")
        attn, self._attn = self._attn, None
        r = fused_count(self._r, x.shape[1], tokens.num_prefix)
        if r == 0:
            return None, None
        if self.one_step_ahead:
            attn = probe(("attn",))["attn"]
        elif attn is None or attn.shape[-1] != x.shape[1]:
            raise StageError(f"mctf (one_step_ahead=0) needs block {layer - 1}'s attention over the {x.shape[1]} "
                             f"tokens entering block {layer}; another method changed the tokens in between")
        red, fused = mctf_step(x, attn.float(), tokens.sizes, r, tokens.num_prefix, *self.taus, self.bidirectional,
                               self.pooling)
        return red, (fused if self.one_step_ahead == 1 else None)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        return 2.0 * num_tokens * num_tokens * info.hidden_size  # mode 0: the full Q K^T kept for the fusion

    def scoring_flops_before_attention(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        n, c, h = num_tokens, info.hidden_size, info.num_heads
        if fused_count(self._r, n, info.num_prefix) == 0:
            return 0.0
        flops = 2.0 * (n / 2) ** 2 * c + 3.0 * n * c  # cosine similarity A @ B^T, normalisation
        flops += h * n * n + 8.0 * (n / 2) ** 2  # attention received; info/size criteria and their product
        flops += 2.0 * n * c  # weighted fusion of the tokens
        if self.one_step_ahead == 1:
            flops += h * n * n + 2.0 * h * n * n  # fused attention: key sums, weighted query averages
        return flops
