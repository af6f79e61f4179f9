"""Budgets: how much a method may keep. One meaning each, the same for every method.

``keep_ratio`` (float in (0, 1]; 1.0 reduces nothing) is the common budget every method
accepts besides its native parameters. Its meaning depends only on the stage:

* encoder stage — the mean, over the encoder's blocks, of the number of tokens each block's
  MLP processes, divided by the number of tokens entering the encoder. Token-linear work
  (QKV, projection, MLP) dominates a ViT, so this is close to the fraction of encoder FLOPs
  kept; each method solves its native schedule (ToMe's ``r``, EViT's keep rate, …) for the
  value nearest to it, so "0.5" buys about the same compute from every method.
* connector / decoder stage — the fraction of visual tokens kept.
* kv-cache stage — the fraction of context entries kept in the cache.

Native budgets are explicit types so they cannot be confused with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import BudgetError
from .params import check_float, check_int


@dataclass(frozen=True)
class KeepRatio:
    ratio: float

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (0.0 < float(self.ratio) <= 1.0):
            raise BudgetError(f"keep_ratio must be a float in (0, 1] (1.0 reduces nothing); got {self.ratio!r}")


@dataclass(frozen=True)
class KeepCount:
    count: int

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise BudgetError(f"keep count must be an integer >= 1; got {self.count!r}")


@dataclass(frozen=True)
class Schedule:
    """Tokens removed at each block (ToMe's per-layer ``r``)."""

    removed: tuple[int, ...]

    def __post_init__(self):
        if any(isinstance(r, bool) or (not isinstance(r, int)) or r < 0 for r in self.removed):
            raise BudgetError(f"a per-layer schedule holds integers >= 0; got {self.removed!r}")


@dataclass(frozen=True)
class Threshold:
    value: float


def tome_schedule(num_layers: int, r) -> Schedule:
    """ToMe's ``r`` as a per-layer schedule, exactly as ToMe's ``parse_r``.

    ``r`` is an int (the same every layer), a list (one per layer; a shorter list is padded
    with zeros), or ``(r, inflect)``: the schedule runs linearly from ``int(r*(1-inflect))`` at
    the first block to ``2r - that`` at the last, each entry truncated to an int (inflect -1:
    2r at the start, 0 at the end).
    """
    if isinstance(r, list) or (isinstance(r, tuple) and len(r) != 2):
        rs = [int(v) for v in r]
        if len(rs) > num_layers:
            raise BudgetError(f"a per-layer r has at most {num_layers} entries, one per block; got {len(rs)}")
        return Schedule(tuple(rs + [0] * (num_layers - len(rs))))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise BudgetError(f"ToMe r must be an integer >= 0 (tokens merged per block); got {r!r}")
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return Schedule(tuple(max(int(min_val + step * i), 0) for i in range(num_layers)))


def check_keep_ratio(method: str, value) -> float | None:
    """The common budget ``keep_ratio`` of ``method``: a number in (0, 1], or None (not given)."""
    return check_float(method, "keep_ratio", value, min=0.0, max=1.0, min_open=True, optional=True,
                       error=BudgetError, why="1.0 reduces nothing")


def check_keep_count(method: str, value) -> int | None:
    """The budget ``keep_count`` (entries or tokens kept per sample): an integer >= 1, or None (not given)."""
    return check_int(method, "keep_count", value, min=1, optional=True, error=BudgetError)


def check_nonempty(lengths, method: str, what: str = "real tokens") -> None:
    """Raise `BudgetError` if a sample of the batch has no real entries (``lengths`` [B], a tensor or a list).

    A left-padded row whose attention_mask is all zeros has nothing to keep or score; no budget
    can fix that, so say which sample it is rather than advise a budget.
    """
    counts = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
    empty = [i for i, n in enumerate(counts) if int(n) <= 0]
    if empty:
        which = f"sample {empty[0]} has" if len(empty) == 1 else f"samples {', '.join(map(str, empty))} have"
        rows = "its attention_mask row is" if len(empty) == 1 else "their attention_mask rows are"
        raise BudgetError(f"{method}: {which} no {what} ({rows} all zeros); remove "
                          f"{'it' if len(empty) == 1 else 'them'} from the batch")


def mean_kept(counts: Sequence[float], num_tokens: int) -> float:
    """The encoder keep ratio of a run whose blocks' MLPs saw ``counts`` tokens."""
    return sum(counts) / (len(counts) * num_tokens)


def solve_integer(ratio_of: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The integer parameter in [lo, hi] whose keep ratio is nearest ``target``.

    ``ratio_of`` must be non-increasing (more reduction keeps less). Ties go to the smaller
    parameter (less reduction).
    """
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio_of(mid) > target:
            lo = mid + 1
        else:
            hi = mid
    best = lo
    if lo > 0 and abs(ratio_of(lo - 1) - target) <= abs(ratio_of(lo) - target):
        best = lo - 1
    return best


def solve_float(ratio_of: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 1.0, iters: int = 40) -> float:
    """The parameter in [lo, hi] whose keep ratio is nearest ``target`` (``ratio_of`` non-decreasing)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ratio_of(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi if abs(ratio_of(hi) - target) <= abs(ratio_of(lo) - target) else lo
