"""DyMU's DToMe — Dynamic Merging and Virtual Unmerging (Wang et al., arXiv 2504.17040).

DToMe is ToMe with a similarity threshold per block instead of a fixed count: in every
block, after the attention residual and before the MLP, split the tokens alternately into
A (even) and B (odd), match each A token to its most similar B token (cosine of the
head-averaged keys) and merge every edge whose similarity exceeds the block's threshold
(at most half the tokens, as ToMe's clamp). Simple images lose many tokens, busy ones few,
so the count varies per image. The thresholds are calibrated once on a set of images: run
the model with a per-block ToMe schedule ``r_l`` where each batch merges its ``r_l * B``
best edges *pooled over the batch*, and take the mean over batches of the best edge that
was not merged. Virtual unmerging (VTU) in the language model: `methods.dymu_vtu`.

Follows the reference code (MikeWangWZHL/dymu ``src/open_clip/tome.py``): same split and
protection, same pooled calibration (``tau = max(score[r*B], 0)``, strict ``>`` at
inference, per-image clamp ``(n - protected) // 2``), proportional attention in every
block, padding with zero-size masked tokens for batches, DyMU's ``r_total`` schedules
(``_get_rs``: ``constant`` and ``(reverse_)linear``). Differences from the reference code:

* Precision: ``threshold_finder`` runs the model in bf16 and stores bf16 thresholds. bf16
  has a step of 1/256 near 1, exactly where the thresholds live (0.87-0.999 on DINOv2-S),
  so a rounded threshold shifts how many edges pass. We calibrate with the model in the
  dtype it runs inference in (fp32 here), score edges in fp32 whatever the model dtype, and
  keep thresholds as unrounded Python floats.
* The model is not switched to train mode for calibration (the reference uses train mode
  only as a "calibrate now" switch; it would also turn on dropout / drop-path); a plain
  mean over batches replaces the reference's running mean (the same value, without its
  "a threshold of exactly 1.0 restarts the average" quirk).
* Layout: one order for every batch size — protected tokens, unmerged A tokens and B
  tokens each in token order, then padding; a sample with no merge in a block keeps its
  order. The reference orders unmerged A by score at batch size 1 without [CLS] (SigLIP),
  and reorders non-merging samples inside a merging batch, so a sample's result depends on
  its batch there; here batched == per-image (up to float rounding: an edge scoring within
  ~1e-7 of a threshold may flip with the batch shape). Merged tokens are exact
  size-weighted means (the reference's batch path divides by ``size + 1e-4``).
* Sorting: our merge keeps token order with a stable sort, whereas the reference's batch
  path moves padding with a non-stable ``argsort``. As shipped, its calibrated thresholds
  then differ from ours by up to 1e-2; with a stable sort and exact means, by 2e-7.
* A block with threshold >= 1 (including blocks whose calibration ``r_l`` was 0, the
  reference's "never merge" 1.0) does not merge: cosine similarity cannot exceed 1.
* ``linear`` schedules whose reference loop never ends (small ``r_total``) stop after
  ``L - 1`` entries and put the remainder last. ``max_r_per_instance_ratio`` is not offered.
* Budgets: DyMU's ``r_total`` (+ ``r_schedule``), ToMe's per-block ``r``, or ``keep_ratio``,
  which picks the ``r_total`` whose calibration schedule meets the common encoder
  budget (`core.budget`); at inference the ratio is met on average over the calibration
  distribution, not per image — that is the point of the method.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from ..core.budget import Schedule, mean_kept, tome_schedule
from ..core.errors import BudgetError, CalibrationError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_bool, check_choice, check_int, check_per_layer_r
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .tome import bipartite_scores, matching_flops, tome_counts

NEVER = 1.0  # threshold of a block that does not merge (the reference's initial value)


# ---------------------------------------------------------------------------- schedules
def dymu_schedule(num_layers: int, r_total: int, kind: str = "constant") -> Schedule:
    """DyMU's ``_get_rs``: ``r_total`` merges spread over the blocks.

    ``constant``: ``r_total // L`` each, the remainder +1 on the first blocks. ``linear``:
    decreasing from ``2 * r_total // L``, the remainder appended, zeros after;
    ``reverse_linear`` is its mirror.
    """
    if not isinstance(r_total, int) or r_total < 0:
        raise BudgetError(f"dymu r_total must be an integer >= 0 (tokens merged over all blocks); got {r_total!r}")
    if kind == "constant":
        base, extra = divmod(r_total, num_layers)
        return Schedule(tuple(base + (1 if i < extra else 0) for i in range(num_layers)))
    if kind not in ("linear", "reverse_linear"):
        raise BudgetError(f"dymu r_schedule must be 'constant', 'linear' or 'reverse_linear'; got {kind!r}")
    if r_total == 0:
        return Schedule((0,) * num_layers)
    r0 = (2 * r_total) // num_layers
    step = r0 / num_layers
    s: list[int] = []
    while len(s) < num_layers - 1 and sum(s) + int(r0 - len(s) * step) < r_total:
        s.append(int(r0 - len(s) * step))
    s.append(r_total - sum(s))
    s += [0] * (num_layers - len(s))
    return Schedule(tuple(s if kind == "linear" else s[::-1]))


@lru_cache(maxsize=64)
def solve_r_total(num_layers: int, num_tokens: int, num_prefix: int, ratio: float, kind: str) -> int:
    """The ``r_total`` whose schedule's encoder keep ratio is nearest ``ratio`` (ties: less merging).

    An exhaustive scan: the ``linear`` schedules are not monotone in ``r_total``.
    """
    best, best_err = 0, math.inf
    for r_total in range(num_layers * (num_tokens // 2) + 1):
        counts = tome_counts(num_tokens, num_prefix, dymu_schedule(num_layers, r_total, kind))
        err = abs(mean_kept(counts, num_tokens) - ratio)
        if err < best_err:
            best, best_err = r_total, err
    return best


# ---------------------------------------------------------------------------- planning
def best_edges(metric: Tensor, num_prefix: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each A token's best B partner: (score [B, Na], partner index into B [B, Na]), fp32.

    Protected and padded tokens get score -inf (they neither merge nor receive).
    """
    return bipartite_scores(metric.float(), num_prefix, valid).max(dim=-1)


def threshold_merges(node_max: Tensor, threshold: float, cap: Tensor) -> Tensor:
    """Inference: which A rows merge [B, Na] bool — every edge scoring ``> threshold``, but at
    most ``cap[b]`` per sample (the best ones)."""
    order = node_max.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    r = torch.minimum((node_max > threshold).sum(1), cap)
    return rank < r[:, None]


def pooled_merges(node_max: Tensor, r: int) -> tuple[Tensor, float]:
    """Calibration: the ``r * B`` best edges of the whole batch merge [B, Na] bool, and the
    batch's threshold: the score of the best edge that did not merge, clamped at >= 0."""
    flat = node_max.reshape(-1)
    order = flat.argsort(descending=True, stable=True)
    rb = r * node_max.shape[0]
    merged = torch.zeros_like(flat, dtype=torch.bool)
    merged[order[:rb]] = True
    merged &= torch.isfinite(flat)
    tau = float(flat[order[min(rb, flat.numel() - 1)]])
    return merged.view_as(node_max), max(tau, 0.0)


def plan_merge(merged: Tensor, partner: Tensor, sizes: Tensor, num_prefix: int, valid: Tensor | None) -> Reduction:
    """The Reduction merging A row ``j`` into B token ``partner[:, j]`` wherever ``merged``.

    Output layout per sample: protected tokens, unmerged A tokens, B tokens (each in token
    order), then padding; a sample with no merge keeps its order. Padded inputs are dropped.
    """
    b, n = sizes.shape
    dev = sizes.device
    idx = torch.arange(n, device=dev)
    a_merged = torch.zeros(b, n, dtype=torch.bool, device=dev)
    a_merged[:, ::2] = merged
    kept = ~a_merged if valid is None else valid & ~a_merged
    group = torch.where(idx < num_prefix, 0, torch.where(idx % 2 == 0, 1, 2))  # prefix, A, B
    key = torch.where(merged.any(1, keepdim=True), group * n + idx, idx)
    key = torch.where(kept, key, 3 * n)
    order = key.argsort(dim=1, stable=True)
    slot = torch.empty_like(order).scatter_(1, order, idx.expand(b, n))
    dest = torch.where(kept, slot, -1)
    into = dest.gather(1, 2 * partner + 1)  # the slot of each A row's partner
    dest[:, ::2] = torch.where(merged, into, dest[:, ::2])
    return Reduction.merge(dest, int(kept.sum(1).max()), sizes)


# ---------------------------------------------------------------------------- the method
@register
class DToMe(EncoderMethod):
    name = "dymu"
    paper = "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs"
    arxiv = "2504.17040"
    signals = ("keys",)
    needs_calibration = True

    def __init__(self, r: int | list | tuple | None = None, keep_ratio: float | None = None, r_total: int | None = None,
                 r_schedule: str = "constant", prop_attn: bool = True):
        super().__init__(keep_ratio)
        r = check_per_layer_r(self.name, "r", r)
        r_total = check_int(self.name, "r_total", r_total, min=0, optional=True, error=BudgetError,
                            why="tokens merged over all blocks")
        self.r_schedule = check_choice(self.name, "r_schedule", r_schedule, ("constant", "linear", "reverse_linear"))
        self.prop_attn = check_bool(self.name, "prop_attn", prop_attn)
        given = [k for k, v in (("r", r), ("r_total", r_total), ("keep_ratio", keep_ratio)) if v is not None]
        if len(given) != 1:
            raise BudgetError("dymu needs exactly one calibration budget: keep_ratio=<float in (0, 1]>, a ToMe-style "
                              f"r=... per block, or DyMU's r_total=... (with r_schedule); got {given or 'none'}")
        self.r, self.r_total = r, r_total
        self.thresholds: list[float] | None = None
        self.calibration: dict = {}  # what the thresholds were calibrated with (informative)
        self._calibrating = False
        self.schedule: Schedule | None = None

    def describe(self) -> str:
        if self.r is not None:
            budget = f"r={self.r}"
        elif self.r_total is not None:
            budget = f"r_total={self.r_total}, r_schedule={self.r_schedule!r}"
        else:
            budget = super().describe()
        return budget + ("" if self.thresholds is not None else ", uncalibrated")

    @classmethod
    def tokens_left_budget(cls, left: int, patches: int) -> dict:
        """``r_total`` = the merges that leave ``left`` tokens: the thresholds, calibrated for it, meet it on average."""
        return {"r_total": patches - left}

    @property
    def calibrated(self) -> bool:
        return self.thresholds is not None

    # ------------------------------------------------------------------ calibration
    def calibration_schedule(self, num_layers: int, num_tokens: int, num_prefix: int) -> Schedule:
        """The per-block ``r`` calibration runs with, for inputs of ``num_tokens`` tokens."""
        if self.r is not None:
            return tome_schedule(num_layers, self.r)
        r_total = self.r_total
        if r_total is None:
            r_total = solve_r_total(num_layers, num_tokens, num_prefix, float(self.budget.ratio), self.r_schedule)
        return dymu_schedule(num_layers, r_total, self.r_schedule)

    # `tokenreduce.calibrate(method, model, batches)` runs the model with the method attached: each forward merges
    # by the calibration schedule and records the thresholds it implied; their means become the thresholds
    def begin_calibration(self) -> None:
        self._taus: list[list[float]] | None = None
        self._num, self._images, self._seen = 0, 0, []
        self._calibrating = True

    def observe_forward(self, stats, items: int) -> None:
        self._num += 1
        self._images += items
        self._seen.append(stats.mlp_tokens_per_layer)

    def end_calibration(self, completed: bool) -> None:
        self._calibrating = False
        if not completed:
            return
        if self._num == 0:
            raise CalibrationError("calibrating dymu got no batches; pass an iterable of pixel_values tensors "
                                   "[B, 3, H, W]")
        self.thresholds = [sum(t) / len(t) if t else NEVER for t in self._taus]
        self.calibration = {"schedule": list(self.schedule.removed), "num_tokens": self._n0,
                            "num_batches": self._num, "num_images": self._images,
                            "mlp_tokens_per_layer": [sum(c) / len(c) for c in zip(*self._seen)]}

    def state_dict(self) -> dict:
        """The calibrated thresholds (and what they were calibrated with), to save and reload."""
        if self.thresholds is None:
            raise CalibrationError("dymu has no thresholds to save yet; call tokenreduce.calibrate(method, model, batches) first")
        return {"method": self.name, "thresholds": list(self.thresholds), **self.calibration}

    def load_state_dict(self, state: dict) -> "DToMe":
        """Use thresholds saved by `state_dict` (no calibration run needed). Returns ``self``."""
        th = state.get("thresholds")
        numbers = isinstance(th, (list, tuple)) and all(isinstance(t, (int, float)) and not math.isnan(t) for t in th)
        if not numbers or not th:
            raise CalibrationError("a dymu state needs 'thresholds': a non-empty list of numbers, one per block; "
                                   f"got {th!r}")
        self.thresholds = [float(t) for t in th]
        self.calibration = {k: v for k, v in state.items() if k not in ("method", "thresholds")}
        return self

    # ------------------------------------------------------------------ the forward
    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        if self._calibrating:
            self.schedule = self.calibration_schedule(info.num_layers, num_tokens, info.num_prefix)
            self._n0 = num_tokens
            if self._taus is None:
                self._taus = [[] for _ in range(info.num_layers)]
            return
        if self.reduces_nothing:
            return
        if self.thresholds is None:
            raise CalibrationError("dymu (DToMe) merges by per-block thresholds that must be calibrated before use: "
                                   "call tokenreduce.calibrate(method, model, batches) first (or load_state_dict(saved))")
        if len(self.thresholds) != info.num_layers:
            raise CalibrationError(f"dymu was calibrated for {len(self.thresholds)} blocks but this {info.family} "
                                   f"encoder has {info.num_layers}; calibrate on this model")

    def merges_at(self, layer: int) -> bool:
        if self._calibrating:
            return self.schedule.removed[layer] > 0
        return self.thresholds[layer] < NEVER

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        n, p = x.shape[1], tokens.num_prefix
        if not self.merges_at(layer):
            return None
        with torch.no_grad():
            node_max, partner = best_edges(signals["keys"].mean(1), p, tokens.valid)
            if self._calibrating:
                r = min(self.schedule.removed[layer], (n - p) // 2)
                if r <= 0:
                    return None
                merged, tau = pooled_merges(node_max, r)
                self._taus[layer].append(tau)
            else:
                merged = threshold_merges(node_max, self.thresholds[layer], (tokens.counts() - p) // 2)
            if not bool(merged.any()):
                return None
            return plan_merge(merged, partner, tokens.sizes, p, tokens.valid)

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        return matching_flops(num_tokens, info) if self.merges_at(layer) else 0.0
