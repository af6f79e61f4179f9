"""Schedule search for any in-LLM method: G-Search and P-Sigmoid.

From *Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction*
(Zhao, Wang, Juefei-Xu, Xia, Liu, Wang, Liang, Zhang, Metaxas, Yu; CVPR 2025; arXiv 2412.00556).
The paper observes that the ranking of visual tokens by the last token's attention is similar
from layer to layer (except the first), assumes that the number of essential visual tokens does
not grow with depth, and proposes two searches over a per-layer keep schedule on a calibration set:

* **G-Search** (scenario I, "cut cost without losing accuracy"): greedily, from the shallowest
  layer to the deepest, keep the fewest visual tokens at each layer such that the calibration
  score does not drop, the deeper layers keeping at most as many. Under the paper's assumption the
  greedy choice is the optimal schedule.
* **P-Sigmoid** (scenario II, "best accuracy for a FLOPs budget"): the kept fraction follows a
  decreasing parametric sigmoid over depth (the shape G-Search finds), and its parameters are tuned
  by Bayesian optimisation for the calibration score under the FLOPs budget.

Both take ``evaluate(schedule) -> float`` from the caller (a calibration accuracy, or agreement with
the full model's answers; higher is better; `search.vlm` has one for the mini-LLaVA) and return a
`core.schedule.LayerSchedule` plus the log of every evaluation. Every distinct schedule is evaluated
once (memoised).

The paper has no public code (we found none), and we could read only its abstract and secondary
summaries, not its method section; what follows is written from those, and where the exact
definitions were not available to us we say so. Where ours differs, and why:

* **Search unit.** We search the integer count of visual tokens kept at each layer (the fraction
  stored is ``count / visual_tokens``, which the runtime maps back to exactly ``count``), by
  bisection between 1 and the previous layer's count: under the paper's monotone assumption
  (fewer tokens never score higher) bisection finds the same minimum as a linear scan in
  ``O(log N)`` evaluations per layer instead of ``O(N)``. (The paper's per-layer search procedure,
  step and any grid could not be checked; one secondary summary says it uses Bayesian
  optimisation per layer.) On a real, noisy calibration score the assumption is only approximate
  and bisection is then a heuristic.
* **"Without losing accuracy"** is ``score >= reference - tolerance`` with ``reference`` the
  unreduced model's score on the same calibration set (``tolerance=0`` by default); the paper's
  exact stopping tolerance is not known to us.
* **Stopping rule.** Layers are visited shallow to deep once; the search stops early when one
  token is left (nothing more to drop). Drop layers are >= 1 (our runtime scores a drop at layer
  ``K`` from layer ``K - 1`` or ``K``'s own projections; the paper also leaves the first layer,
  whose ranking differs, unreduced). ``layers`` restricts the candidate drop layers (cost).
* **P-Sigmoid's form.** Ours: ``keep(l) = floor + (1 - floor) * sigmoid(-steepness * (l - centre))``
  for layers ``l >= first_layer`` (every token before), rounded to whole tokens. The paper's exact
  parametrisation could not be checked; this one contains the shapes of FastV (steep, floor
  ``1 - R``) and of smooth pyramids.
* **The budget constraint.** The paper optimises the sigmoid's parameters by BO under a FLOPs
  constraint. We make every trial feasible and spend the budget by construction: for each
  ``(steepness, floor)`` the optimiser proposes, the centre is solved by bisection as the latest
  one whose schedule's FLOPs stay within the budget (FLOPs grow with the centre), and the floor is
  proposed as a share of the highest constant floor the budget allows. BO therefore searches only
  the shape, no trial is wasted on an infeasible or under-spending schedule, and the result never
  exceeds the budget. Ties in score go to the cheaper schedule, then the earlier trial.
* **The optimiser.** Optuna's ``GPSampler`` (Gaussian-process Bayesian optimisation, seeded; the
  paper says "Bayesian Optimization" without a library we could check), or its TPE sampler
  (``sampler="tpe"``). Optuna is an optional dependency: ``pip install 'tokenreduce[search]'``.
* **Calibration set size.** The paper's is not known to us; ``tokenreduce search-schedule`` uses
  ``--n`` questions of the task's calibration split (64 by default), disjoint from the held-out
  questions the benchmark reports on.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from ..core.errors import BudgetError, MissingDependencyError
from ..core.params import is_int, is_real
from ..core.schedule import LayerSchedule

PAPER = ("Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction "
         "(Zhao et al., CVPR 2025)")
ARXIV = "2412.00556"
OPTUNA_PIP = "pip install 'tokenreduce[search]'  (or: pip install 'optuna>=4.0')"

Evaluate = Callable[[LayerSchedule], float]


class SearchResult(NamedTuple):
    """What a search returns: the schedule found and one log entry per distinct evaluation, in order."""

    schedule: LayerSchedule
    log: list[dict]


class _Memo:
    """``evaluate`` called once per distinct schedule; every call logged."""

    def __init__(self, evaluate: Evaluate, progress: Callable[[dict], None] | None):
        self.evaluate, self.progress = evaluate, progress
        self.scores: dict[tuple, float] = {}
        self.log: list[dict] = []

    def __call__(self, schedule: LayerSchedule, **note) -> float:
        key = schedule.drops
        if key not in self.scores:
            score = float(self.evaluate(schedule))
            if not math.isfinite(score):
                raise ValueError(f"evaluate returned {score} for {schedule.describe()}; it must return a finite score")
            self.scores[key] = score
            entry = {"evaluation": len(self.log), "drops": [list(d) for d in key], "score": score, **note}
            self.log.append(entry)
            if self.progress is not None:
                self.progress(entry)
        return self.scores[key]


def _count_fraction(count: int, visual_tokens: int) -> float:
    return count / visual_tokens


def _check_common(num_layers, visual_tokens) -> None:
    if not is_int(num_layers) or num_layers < 2:
        raise BudgetError(f"num_layers must be an integer >= 2 (a drop layer is >= 1); got {num_layers!r}")
    if visual_tokens is not None and (not is_int(visual_tokens) or visual_tokens < 1):
        raise BudgetError(f"visual_tokens must be an integer >= 1; got {visual_tokens!r}")


# ---------------------------------------------------------------------------- G-Search
def g_search(evaluate: Evaluate, num_layers: int, visual_tokens: int, *, tolerance: float = 0.0,
             reference: float | None = None, layers: Sequence[int] | None = None, min_tokens: int = 1,
             source: Mapping[str, Any] | None = None,
             progress: Callable[[dict], None] | None = None) -> SearchResult:
    """The fewest visual tokens kept at each layer, shallow to deep, with the score held (see the module docstring).

    ``evaluate(schedule)``: the calibration score of a schedule (higher is better). ``reference``:
    the score to hold (default: ``evaluate`` of the schedule that drops nothing, the full model);
    a schedule passes when its score is ``>= reference - tolerance``. ``layers``: the candidate
    drop layers (default every layer 1 .. num_layers - 1). ``min_tokens``: the fewest tokens any
    layer may keep. ``source``: extra provenance recorded in the schedule (model, task, ...).
    """
    _check_common(num_layers, visual_tokens)
    if not is_real(tolerance) or tolerance < 0:
        raise BudgetError(f"g_search: tolerance must be a number >= 0 (the score drop allowed); got {tolerance!r}")
    if not is_int(min_tokens) or not 1 <= min_tokens <= visual_tokens:
        raise BudgetError(f"g_search: min_tokens must be an integer in [1, {visual_tokens}]; got {min_tokens!r}")
    candidates = list(range(1, num_layers)) if layers is None else [int(k) for k in layers]
    if not candidates or candidates != sorted(set(candidates)) or candidates[0] < 1 or candidates[-1] >= num_layers:
        raise BudgetError(f"g_search: layers must be distinct ascending drop layers in 1..{num_layers - 1}; "
                          f"got {list(layers) if layers is not None else None}")
    memo = _Memo(evaluate, progress)
    full = memo(LayerSchedule((), num_layers, visual_tokens), step="reference")
    ref = full if reference is None else float(reference)
    threshold = ref - float(tolerance)

    drops: list[tuple[int, float]] = []
    kept = visual_tokens

    def passes(layer: int, count: int) -> bool:
        trial = LayerSchedule(tuple(drops) + ((layer, _count_fraction(count, visual_tokens)),), num_layers, visual_tokens)
        return memo(trial, step="bisect", layer=layer, kept=count) >= threshold

    for layer in candidates:
        if kept <= min_tokens:
            break  # stopping rule: nothing left to drop
        lo, hi = min_tokens, kept  # invariant: keeping `hi` passes (it is the schedule so far)
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(layer, mid):
                hi = mid
            else:
                lo = mid + 1
        if hi < kept:
            drops.append((layer, _count_fraction(hi, visual_tokens)))
            kept = hi
    final = LayerSchedule(tuple(drops), num_layers, visual_tokens)
    best = memo(final, step="final")
    prov = {**dict(source or {}), "search": "g-search", "paper": ARXIV,
            "params": {"tolerance": float(tolerance), "layers": candidates, "min_tokens": min_tokens,
                       **dict((source or {}).get("params", {}))},
            "reference_score": ref, "full_score": full, "score": best, "evaluations": len(memo.log)}
    return SearchResult(LayerSchedule(final.drops, num_layers, visual_tokens, prov), memo.log)


# ---------------------------------------------------------------------------- P-Sigmoid
def p_sigmoid_keep(num_layers: int, steepness: float, centre: float, floor: float,
                   first_layer: int = 1) -> list[float]:
    """The kept fraction at every layer: 1 before ``first_layer``, then
    ``floor + (1 - floor) * sigmoid(-steepness * (layer - centre))`` (decreasing with depth)."""
    out = []
    for layer in range(num_layers):
        if layer < first_layer:
            out.append(1.0)
            continue
        z = steepness * (layer - centre)
        sig = 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0  # sigmoid(-z), overflow-safe
        out.append(floor + (1.0 - floor) * sig)
    return out


def p_sigmoid_schedule(num_layers: int, steepness: float, centre: float, floor: float, visual_tokens: int,
                       first_layer: int = 1) -> LayerSchedule:
    """The P-Sigmoid curve as a schedule of whole tokens: each layer keeps ``round(keep * visual_tokens)`` (at least
    1, never more than the layer before); a drop wherever the count falls."""
    drops: list[tuple[int, float]] = []
    cur = visual_tokens
    for layer, keep in enumerate(p_sigmoid_keep(num_layers, steepness, centre, floor, first_layer)):
        count = min(cur, max(1, int(math.floor(keep * visual_tokens + 0.5))))
        if count < cur:
            drops.append((layer, count / visual_tokens))
            cur = count
    return LayerSchedule(tuple(drops), num_layers, visual_tokens)


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise MissingDependencyError(f"P-Sigmoid tunes its parameters by Bayesian optimisation with Optuna, which is "
                                     f"not installed: {OPTUNA_PIP}") from e
    return optuna


def p_sigmoid_search(evaluate: Evaluate, num_layers: int, flops_of: Callable[[LayerSchedule], float], budget: float,
                     trials: int = 30, seed: int = 0, *, visual_tokens: int = 1000, first_layer: int = 1,
                     steepness: tuple[float, float] = (0.05, 8.0), sampler: str = "gp",
                     source: Mapping[str, Any] | None = None,
                     progress: Callable[[dict], None] | None = None) -> SearchResult:
    """The P-Sigmoid schedule with the best calibration score whose ``flops_of`` stays within ``budget``.

    ``flops_of(schedule)``: the schedule's cost (e.g. analytic prefill FLOPs, or their ratio to
    the full model's), non-decreasing in the tokens kept; ``budget``: the most it may cost, in
    the same unit. ``trials``: schedules the optimiser proposes (Optuna; ``sampler`` "gp", a
    Gaussian-process Bayesian optimiser, or "tpe"), seeded by ``seed``. ``visual_tokens``: the
    image's visual tokens (schedules keep whole tokens; default 1000 = per-mille steps).
    ``steepness``: the range of the sigmoid's slope searched (log-uniform).
    """
    optuna = _optuna()  # before any work
    _check_common(num_layers, visual_tokens)
    if not is_int(trials) or trials < 1:
        raise BudgetError(f"p_sigmoid_search: trials must be an integer >= 1; got {trials!r}")
    if not is_int(seed) or seed < 0:
        raise BudgetError(f"p_sigmoid_search: seed must be an integer >= 0; got {seed!r}")
    if sampler not in ("gp", "tpe"):
        raise BudgetError(f"p_sigmoid_search: sampler must be 'gp' or 'tpe'; got {sampler!r}")
    if not is_int(first_layer) or not 1 <= first_layer < num_layers:
        raise BudgetError(f"p_sigmoid_search: first_layer must be an integer in [1, {num_layers - 1}]; got "
                          f"{first_layer!r}")
    lo_k, hi_k = (float(v) for v in steepness)
    if not 0 < lo_k < hi_k:
        raise BudgetError(f"p_sigmoid_search: steepness must be (low, high) with 0 < low < high; got {steepness!r}")
    if not is_real(budget) or not math.isfinite(float(budget)):
        raise BudgetError(f"p_sigmoid_search: budget must be a finite number (FLOPs, in flops_of's unit); "
                          f"got {budget!r}")
    budget = float(budget)

    def constant(frac: float) -> LayerSchedule:  # keep(l) = frac from first_layer on
        return p_sigmoid_schedule(num_layers, 1.0, -1e9, frac, visual_tokens, first_layer)

    full_cost = float(flops_of(LayerSchedule((), num_layers, visual_tokens)))
    least = float(flops_of(constant(0.0)))  # one token from first_layer on
    if budget < least:
        raise BudgetError(f"p_sigmoid_search: budget {budget:g} is below the cheapest schedule's cost {least:g} (one "
                          f"visual token from layer {first_layer} on); raise the budget")
    if budget >= full_cost:
        raise BudgetError(f"p_sigmoid_search: budget {budget:g} is at or above the full model's cost {full_cost:g}: "
                          "nothing needs dropping; lower the budget")
    lo, hi = 0.0, 1.0  # the highest constant floor within budget
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_of(constant(mid)) <= budget else (lo, mid)
    floor_max = lo

    def solve(k: float, floor: float) -> tuple[float, LayerSchedule]:
        """The latest centre whose schedule fits the budget (FLOPs grow with the centre)."""
        c_lo, c_hi = first_layer - 40.0 / k - 1.0, num_layers + 40.0 / k
        best = p_sigmoid_schedule(num_layers, k, c_lo, floor, visual_tokens, first_layer)
        for _ in range(50):
            mid = (c_lo + c_hi) / 2
            cand = p_sigmoid_schedule(num_layers, k, mid, floor, visual_tokens, first_layer)
            if flops_of(cand) <= budget:
                c_lo, best = mid, cand
            else:
                c_hi = mid
        return c_lo, best

    memo = _Memo(evaluate, progress)
    records: list[dict] = []

    def objective(trial) -> float:
        k = trial.suggest_float("steepness", lo_k, hi_k, log=True)
        share = trial.suggest_float("floor_share", 0.0, 1.0)
        floor = share * floor_max
        centre, schedule = solve(k, floor)
        cost = float(flops_of(schedule))
        score = memo(schedule, trial=trial.number, steepness=k, floor=floor, centre=centre, flops=cost)
        records.append({"trial": trial.number, "score": score, "flops": cost, "schedule": schedule,
                        "params": {"steepness": k, "floor": floor, "centre": centre}})
        return score

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # no per-trial lines (the log and `progress` have them)
    try:
        if sampler == "gp":
            chosen = optuna.samplers.GPSampler(seed=seed)
        else:
            chosen = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(direction="maximize", sampler=chosen)
        study.optimize(objective, n_trials=trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    top = max(records, key=lambda r: (r["score"], -r["flops"], -r["trial"]))
    prov = {**dict(source or {}), "search": "p-sigmoid", "paper": ARXIV,
            "params": {"budget": budget, "trials": trials, "sampler": sampler, "first_layer": first_layer,
                       "steepness_range": [lo_k, hi_k], "floor_max": floor_max, **top["params"],
                       **dict((source or {}).get("params", {}))},
            "seed": seed, "score": top["score"], "flops": top["flops"], "budget": budget, "full_flops": full_cost,
            "best_trial": top["trial"], "evaluations": len(memo.log), "optuna": optuna.__version__}
    return SearchResult(LayerSchedule(top["schedule"].drops, num_layers, visual_tokens, prov), memo.log)
