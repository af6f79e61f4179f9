"""FlowCut — Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (Tong, Jin, Qin, Li,
Zou, Li, Li and Li, NeurIPS 2025, arXiv 2505.19536). The vision-tower stage.

The [CLS] token relays information between patches, so FlowCut scores each patch token by the
flow through [CLS] and accumulates the score over blocks; tokens are pruned progressively, faster
where [CLS] attention has concentrated. In every block, after attention, while a sample has more
than ``target_num`` patch tokens:

1. score each patch token ``j``: ``(a_j + s_j) * ||v_j||_1``, with ``a`` the head-averaged [CLS]
   attention row and ``s`` the head-averaged softmax over tokens of ``v_CLS . v_j`` (per head,
   unscaled), each restricted to the patches and renormalised to sum 1; ``v_j`` is the token's
   value vector averaged over heads (``head_dim`` entries);
2. accumulate: ``S = 0.5 S + 0.5 score`` (the first scoring block sets ``S = score``);
3. at every second block, those with an even number ``k`` of reducing blocks after them: drop
   ``r = round((n - target_num) / sqrt(k) * (1 - H^2))`` tokens, never going below ``target_num``
   (``k = 0``, the last reducing block: down to ``target_num``), ``H`` the entropy of the
   renormalised [CLS] row divided by ``log n``; keep the top ``n - r`` by ``S``, in token order.

A tower that starts with more ends with exactly ``target_num`` patch tokens; the [CLS] token
(every protected prefix token) is always kept and never scored.

Follows the reference code (TungChintao/FlowCut ``flowcut/modeling_clip_flowcut.py``,
``flowcut/utils_flowcut.py``): the same scores, normalisations, accumulation, count rule, rounding
(half to even), the same blocks (in LLaVA the reference reduces in the blocks before the select
layer, the last of them cutting to the target; so does the encoder stage inside a VLM), kept
tokens in token order. ``target_num`` is the reference's ``target_num`` under LLaVA's default
``patch`` features: the visual tokens left at the end of the tower, [CLS] not counted.
Differences from the reference code:

* Batches: the reference drops the same count from every image of a batch, the largest ``r`` of
  the batch (LLaVA-NeXT's crops share it). Here each sample has its own count, so a batch equals
  its samples one at a time; samples with different counts are padded and masked.
* Where: the reference prunes a block's output, after its MLP; here between attention and MLP.
  The MLP acts per token, so the kept tokens are the same vectors; the dropped ones skip the MLP.
* The entropy takes ``0 log 0 = 0``: the reference's ``p log p`` is NaN when a token's
  head-averaged [CLS] weight underflows to 0 (possible in fp16), and its ``int(r.round())`` then
  raises. Scores and entropy are computed
  in float32 and ``r`` in float64, whatever the model's dtype (the reference: the model's dtype).
* The reducing blocks: the reference fixes the select layer at the tower's second-to-last block
  (LLaVA-1.5's); here it is the VLM's own ``vision_feature_layer``, and a tower used alone (no
  select layer) cuts to the target at its last block. ``target_num`` never counts [CLS] (the
  reference counts it under ``cls_patch`` features). All protected prefix tokens (DeiT's
  distillation token) are kept like [CLS], never scored, and enter the value softmax as it does.
* Only the vision-tower stage. LLaVA-NeXT's reference path (``anyres``) halves the tower's target
  and prunes again at the language model's layer 1; that is not implemented.
* Budgets: ``target_num``, or ``keep_ratio`` (the common encoder budget, `core.budget`). FlowCut's
  counts depend on the image (the entropy factor), so ``keep_ratio`` picks the ``target_num``
  whose schedule at fully concentrated [CLS] attention (``H = 0``: the largest drops the rule
  allows) meets it; an image whose [CLS] attention is spread keeps more (never less), and the
  stats report what each forward kept.
* Composition: the accumulated scores follow FlowCut's own tokens; another encoder method that
  reduces the tokens between two of FlowCut's blocks is refused with a `StageError` at that block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.budget import mean_kept, solve_integer
from ..core.errors import BudgetError, StageError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_int
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .tome import raise_budget


# ---------------------------------------------------------------------------- the algorithm
def flow_score(cls_attn: Tensor, values: Tensor, real: Tensor, num_prefix: int) -> Tensor:
    """Each patch token's score ``(a + s) * ||v||_1`` [B, n] (0 for padding).

    ``cls_attn`` [B, H, N] is the [CLS] softmax row, ``values`` [B, H, N, D] the block's values,
    ``real`` [B, n] marks the real patch tokens (``n = N - num_prefix``).
    """
    p = num_prefix
    v = values.float()
    relation = _share(cls_attn.float().mean(1)[:, p:], real)
    present = torch.cat([real.new_ones(real.shape[0], p), real], 1)
    similarity = (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0]  # [B, H, N]: v_CLS . v_j per head, unscaled
    similarity = similarity.masked_fill(~present[:, None], float("-inf"))
    semantic = _share(similarity.softmax(-1).mean(1)[:, p:], real)
    magnitude = v.mean(1)[:, p:].abs().sum(-1)  # L1 norm of the head-averaged value
    return ((relation + semantic) * magnitude).masked_fill(~real, 0.0)


def attention_entropy(cls_attn: Tensor, real: Tensor, num_prefix: int) -> Tensor:
    """Entropy of the renormalised, head-averaged [CLS] row over each sample's patches, over ``log n`` [B]."""
    q = _share(cls_attn.float().mean(1)[:, num_prefix:], real)
    n = real.sum(1).clamp_min(2).double()
    return (-torch.special.xlogy(q, q).sum(-1)).double() / n.log()


def drop_count(n, target: int, remaining: int, entropy):
    """Tokens to drop from ``n`` patch tokens with ``remaining`` blocks left (an even number): all the excess
    over ``target`` at the last block, else ``round((n - target) / sqrt(remaining) * (1 - H^2))`` (half to even).
    Works on Python numbers and on tensors [B]."""
    if remaining == 0:
        return n - target
    if isinstance(n, Tensor):
        return torch.round((n - target).double() / math.sqrt(remaining) * (1 - entropy.double() ** 2)).long()
    return round((n - target) / math.sqrt(remaining) * (1 - entropy ** 2))


def next_count(n: int, target: int, remaining: int, entropy: float) -> int:
    """Patch tokens left after a block with ``remaining`` blocks after it (one sample)."""
    if n <= target or remaining % 2:
        return n
    return max(n - drop_count(n, target, remaining, entropy), target)


def token_counts(num_tokens: int, num_prefix: int, num_layers: int, target: int, entropies=None) -> list[int]:
    """Tokens each block's MLP processes, given each block's [CLS] entropy (default 0: the largest drops)."""
    counts, n = [], num_tokens - num_prefix
    for layer in range(num_layers):
        h = 0.0 if entropies is None else entropies[layer]
        n = next_count(n, target, num_layers - 1 - layer, h)
        counts.append(num_prefix + n)
    return counts


def top_in_order(score: Tensor, real: Tensor, keep: Tensor) -> Tensor:
    """The ``keep[b]`` real tokens of highest ``score`` per sample, in token order, padded with -1 [B, max keep]."""
    n = score.shape[1]
    m = int(keep.max())
    best = score.masked_fill(~real, float("-inf")).topk(m, dim=1).indices
    chosen = torch.arange(m, device=score.device) < keep[:, None]
    ordered = torch.where(chosen, best, n).sort(1).values
    return torch.where(ordered < n, ordered, -1)


def _share(weights: Tensor, real: Tensor) -> Tensor:
    w = weights.masked_fill(~real, 0.0)
    return w / w.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------- the method
@register
class FlowCut(EncoderMethod):
    name = "flowcut"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
    arxiv = "2505.19536"
    signals = ("cls_attn", "values")
    needs_cls = True

    def __init__(self, target_num: int | None = None, keep_ratio: float | None = None):
        super().__init__(keep_ratio)
        self.target_num = check_int(self.name, "target_num", target_num, min=1, optional=True, error=BudgetError,
                                    why="patch tokens left at the end of the tower, [CLS] not counted")
        if (target_num is None) == (keep_ratio is None):
            raise_budget(self.name, "target_num", target_num, keep_ratio)

    def describe(self) -> str:
        return f"target_num={self.target_num}" if self.target_num is not None else super().describe()

    @classmethod
    def tokens_left_budget(cls, left: int, patches: int) -> dict:
        return {"target_num": left}

    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        self._layers = info.num_layers
        patches = num_tokens - info.num_prefix
        if self.target_num is not None:
            self._target = self.target_num
        else:
            ratio = lambda dropped: mean_kept(token_counts(num_tokens, info.num_prefix, info.num_layers,
                                                           patches - dropped), num_tokens)
            self._target = patches - solve_integer(ratio, self.budget.ratio, 0, max(patches - 1, 0))
        self._above = patches > self._target  # some sample still has tokens to drop
        self._flow: Tensor | None = None  # accumulated scores of the current patch tokens [B, n]
        self._left = num_tokens  # tokens FlowCut left (its scores follow them)
        self._scored = -1

    def wants_signals(self, layer: int) -> bool:
        return self._above or layer == 0  # block 0 runs even with nothing to drop: the method has fired

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        b, n, _ = x.shape
        p, target = tokens.num_prefix, self._target
        if self._flow is not None and n != self._left:
            raise StageError(f"{self!r} accumulates each token's score from block to block, but another encoder "
                             f"method changed the tokens before block {layer} ({self._left} -> {n}); attach flowcut "
                             "as the only encoder method that reduces this tower")
        real = tokens.valid[:, p:] if tokens.valid is not None else x.new_ones(b, n - p, dtype=torch.bool)
        count = real.sum(1)
        above = count > target
        if not bool(above.any()):
            self._above = False
            return None
        cls_attn = signals["cls_attn"]
        score = flow_score(cls_attn, signals["values"], real, p)
        self._flow = score if self._flow is None else 0.5 * self._flow + 0.5 * score
        self._scored, self._left = layer, n
        remaining = self._layers - 1 - layer
        if remaining % 2:
            return None
        entropy = attention_entropy(cls_attn, real, p) if remaining else None
        keep = torch.where(above, (count - drop_count(count, target, remaining, entropy)).clamp_min(target), count)
        self._above = bool((keep > target).any())
        if bool((keep == count).all()):
            return None
        kept = top_in_order(self._flow, real, keep)  # [B, m] patch indices
        valid = kept >= 0
        self._flow = self._flow.gather(1, kept.clamp_min(0)).masked_fill(~valid, 0.0)
        prefix = torch.arange(p, device=x.device).expand(b, p)
        self._left = p + kept.shape[1]
        return Reduction.keep(torch.cat([prefix, torch.where(valid, p + kept, -1)], 1), n)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        if self._scored != layer:
            return 0.0
        c = info.hidden_size  # the [CLS] row of Q K^T, v_CLS . V, the head-averaged values
        return 2.0 * num_tokens * c + 2.0 * num_tokens * c + 1.0 * num_tokens * c
