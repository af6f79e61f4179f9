"""VFlowOpt's offline hyperparameter search ("visual information flow-guided optimization"; arXiv 2508.05211).

VFlowOpt (`tokenreduce.methods.vflowopt`) has a few hyperparameters — the global-token threshold ``t``, the
recycling cell ``a``, the entropy weight ``alpha``, and the split of the token budget between the tower and the
language-model drops — that the paper does not fix by hand: it searches them per model, on a small calibration
set, so that the pruned model's representation of the *last prompt token* (the token that has read the whole
image and question) stays as close as possible to the unpruned model's.

What the reference does (sihany077/VFlowOpt at 129eeef, ``lmms_eval/models/llava_ov_opt_all.py``,
``generate_until``):

* objective: for each calibration prompt, the cosine similarity of the last token's hidden state after the
  language model's final norm (the prefill's last entry of ``hidden_states``), with vs without pruning, summed over
  the prompts and maximised (a NaN counts 0);
* calibration set: 30 requests drawn at random from its ``opt_data`` task (LLaVA-OneVision training data);
* optimiser: scikit-optimize's Gaussian-process ``Optimizer`` (``random_state=42``, 27 random initial points,
  300 calls, proposals clipped to the bounds);
* search space: the tower's keep ratio in [0.25, 0.375], the keep ratio at LLM layer 9 in [0.2/0.375, 1], ``t`` in
  [0, 50], ``a`` in [3, 24], ``alpha`` in [-1, 1]; the keep ratio at layer 18 is solved so that the kept fraction
  averaged over the 28 layers is the target (25 % in the file as released).

Ours (`vflowopt_search`, `LastTokenEvaluator`, `run_vflowopt_search`), and why it differs:

* objective: the same cosine, of the same state (`LastTokenEvaluator`: the language model's last hidden state
  after its final norm, at the last prompt position), averaged instead of summed (the same optimum), NaN as 0;
* search space: ``t`` in [0, 50] and ``a`` in [3, 24] (the reference's bounds; `run_vflowopt_search` lowers the
  upper bound of ``a`` to the grid's side, beyond which every token is in one cell). The keep ratios are not
  searched: only the tower stage is implemented (no language-model drops, see the method's docstring), so the
  budget is the caller's ``keep_ratio``. ``alpha`` stays 0: the connector stage does not see the pixels its
  entropy term needs. ``t`` is dropped from the space if a connector gives only the [CLS] row (it then has no
  effect: the probe in `run_vflowopt_search` checks this; the runtime's connector gives the whole map);
* optimiser: Optuna (as `search.schedules`), ``GPSampler`` (Gaussian-process Bayesian optimisation) or ``"tpe"``,
  seeded, ``startup`` random trials first (Optuna's default 10, the reference's 27 of 300), ``trials`` in all
  (30 by default: the mini-LLaVA's search fits in minutes on a CPU);
* calibration set: ``n`` questions (30, the reference's count) of the task's ``"calib"`` split (`assets.vqa`),
  disjoint from the held-out ``"test"`` questions the benchmark reports on.

The result is saved as a params file (`methods.vflowopt.save_params`) that
``get_method("vflowopt", params_file=...)`` loads (its budget too, when none is given).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ..core.errors import BudgetError, ParameterError, StageError
from ..core.params import is_int, is_real
from ..methods.vflowopt import SEARCHED, save_params
from .schedules import _optuna

PAPER = "VFlowOpt (Yang et al., ICCV 2025)"
ARXIV = "2508.05211"
DEFAULT_SPACE: dict[str, tuple[float, float]] = {"t": (0.0, 50.0), "a": (3.0, 24.0)}  # the reference's bounds
LOWEST = {"t": 0.0, "a": 1.0}  # what the method accepts
OBJECTIVE = "cosine of the last prompt token's final-norm hidden state, with vs without pruning (mean over prompts)"

Evaluate = Callable[[dict], float]


class VFlowOptSearchResult(NamedTuple):
    """The best hyperparameters (``t``, ``a``, ``alpha``; a parameter not searched is None = the method's default),
    their calibration score, and one log entry per trial."""

    params: dict
    score: float
    log: list[dict]


def check_space(space: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    """``{"t": (low, high), "a": (low, high)}`` (either or both), checked."""
    space = dict(DEFAULT_SPACE if space is None else space)
    if not space:
        raise ParameterError("vflowopt_search: the space is empty; search t and/or a")
    out = {}
    for name, bounds in space.items():
        if name not in LOWEST:
            extra = " (alpha stays 0: the connector stage has no pixels)" if name == "alpha" else ""
            raise ParameterError(f"vflowopt_search: cannot search {name!r}{extra}; the space holds t and/or a")
        try:
            lo, hi = bounds
        except (TypeError, ValueError):
            raise ParameterError(f"vflowopt_search: space[{name!r}] must be (low, high); got {bounds!r}") from None
        if not (is_real(lo) and is_real(hi) and math.isfinite(lo) and math.isfinite(hi) and LOWEST[name] <= lo < hi):
            raise ParameterError(f"vflowopt_search: space[{name!r}] must be finite (low, high) with "
                                 f"{LOWEST[name]:g} <= low < high; got {bounds!r}")
        out[name] = (float(lo), float(hi))
    return out


def vflowopt_search(evaluate: Evaluate, *, space: Mapping[str, Sequence[float]] | None = None, trials: int = 30,
                    seed: int = 0, sampler: str = "gp", startup: int | None = None,
                    progress: Callable[[dict], None] | None = None) -> VFlowOptSearchResult:
    """The hyperparameters in ``space`` that maximise ``evaluate(params) -> score`` (higher is better; e.g.
    `LastTokenEvaluator`), by Bayesian optimisation (Optuna; ``sampler`` "gp" or "tpe"), ``trials`` proposals of
    which the first ``startup`` (default ``min(10, trials)``) are random. A proposal seen before is not evaluated
    again (its log entry says ``cached``). Ties go to the earlier trial."""
    optuna = _optuna()  # before any work
    space = check_space(space)
    if not is_int(trials) or trials < 1:
        raise BudgetError(f"vflowopt_search: trials must be an integer >= 1; got {trials!r}")
    if not is_int(seed) or seed < 0:
        raise BudgetError(f"vflowopt_search: seed must be an integer >= 0; got {seed!r}")
    if sampler not in ("gp", "tpe"):
        raise ParameterError(f"vflowopt_search: sampler must be 'gp' or 'tpe'; got {sampler!r}")
    startup = min(10, trials) if startup is None else startup
    if not is_int(startup) or not 1 <= startup <= trials:
        raise BudgetError(f"vflowopt_search: startup must be an integer in [1, trials={trials}]; got {startup!r}")
    log: list[dict] = []
    memo: dict[tuple, float] = {}  # the objective is deterministic: a repeated proposal is not run again

    def objective(trial) -> float:
        params = {k: None for k in SEARCHED}
        params["alpha"] = 0.0
        for name, (lo, hi) in space.items():
            params[name] = trial.suggest_float(name, lo, hi)
        key = tuple(round(params[k], 9) for k in space)
        cached = key in memo
        if not cached:
            score = float(evaluate(dict(params)))
            if math.isnan(score):
                score = 0.0  # as the reference: a NaN similarity counts nothing
            if not math.isfinite(score):
                raise ValueError(f"evaluate returned {score} for {params}; it must return a finite score")
            memo[key] = score
        score = memo[key]
        entry = {"trial": trial.number, "score": score, "cached": cached, **{k: params[k] for k in space}}
        log.append(entry)
        if progress is not None:
            progress(entry)
        return score

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        if sampler == "gp":
            with warnings.catch_warnings():  # deterministic_objective is flagged experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                chosen = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, deterministic_objective=True)
        else:
            chosen = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        study = optuna.create_study(direction="maximize", sampler=chosen)
        study.optimize(objective, n_trials=trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = max(log, key=lambda e: (e["score"], -e["trial"]))
    params = {k: None for k in SEARCHED}
    params["alpha"] = 0.0
    params.update({k: best[k] for k in space})
    return VFlowOptSearchResult(params, best["score"], log)


# ---------------------------------------------------------------------------- the objective on a VLM
class LastTokenEvaluator:
    """``evaluate(params) -> mean cosine`` of the last prompt token's final-norm hidden state, pruned by VFlowOpt at
    ``keep_ratio`` (or ``keep_count``) with ``params`` vs the unpruned model, over prepared input ``batches``
    (dicts of a processor's tensors, left-padded: the last position is every prompt's last token)."""

    def __init__(self, model, batches: Sequence[dict], keep_ratio: float | None = None,
                 keep_count: int | None = None, method_params: Mapping[str, Any] | None = None):
        from ..families.decoders import find_decoder

        if not batches:
            raise StageError("LastTokenEvaluator: no calibration batches")
        self.model, self.batches = model, list(batches)
        self.budget = {"keep_ratio": keep_ratio} if keep_count is None else {"keep_count": keep_count}
        self.extra = dict(method_params or {})
        bad = sorted(set(self.extra) & set(SEARCHED) | set(self.extra) & {"keep_ratio", "keep_count", "params_file"})
        if bad:
            raise ParameterError(f"LastTokenEvaluator: method_params may not set {bad} (searched, or the budget)")
        self.method(dict.fromkeys(SEARCHED))  # parameter errors now, not after the model ran
        _fam, self.backbone = find_decoder(model)
        self.evaluations, self.seconds = 0, 0.0
        self.scored_with: str | None = None
        self.full = self._last_states(None)

    def method(self, params: Mapping[str, Any]):
        import tokenreduce

        given = {k: v for k, v in params.items() if v is not None and k in SEARCHED}
        return tokenreduce.get_method("vflowopt", **self.budget, **self.extra, **given)

    def _last_states(self, method) -> torch.Tensor:
        import tokenreduce

        seen: list[torch.Tensor] = []

        def grab(module, args, kwargs, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            seen.append(hidden[:, -1].float())

        t0 = time.perf_counter()
        hook = self.backbone.register_forward_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for inputs in self.batches:
                    if method is None:
                        self.model(**inputs, logits_to_keep=1)
                    else:
                        with tokenreduce.apply(self.model, method):
                            self.model(**inputs, logits_to_keep=1)
        finally:
            hook.remove()
        self.seconds += time.perf_counter() - t0
        if method is not None:
            self.scored_with = method.scored_with
        return torch.cat(seen)

    def __call__(self, params: Mapping[str, Any]) -> float:
        self.evaluations += 1
        pruned = self._last_states(self.method(params))
        cos = torch.nn.functional.cosine_similarity(self.full, pruned, dim=-1)
        return float(torch.nan_to_num(cos, nan=0.0).mean())


# ---------------------------------------------------------------------------- the mini-LLaVA driver
@dataclass
class VFlowOptSearchConfig:
    task: str = "easyvqa"
    n: int = 30  # calibration questions (the reference's 30)
    keep_ratio: float = 0.25
    trials: int = 30
    startup: int | None = None
    sampler: str = "gp"
    seed: int = 0
    batch_size: int = 16
    model: str = "minillava"
    space: Mapping[str, Sequence[float]] | None = None
    out: str | None = "vflowopt.json"


def run_vflowopt_search(cfg: VFlowOptSearchConfig, model=None, processor=None, log: Callable[[str], None] = print,
                        progress: bool = True) -> VFlowOptSearchResult:
    """Search VFlowOpt's ``t`` and ``a`` on ``cfg.n`` calibration questions of the mini-LLaVA, save them to ``cfg.out``
    (if set) and return them. ``t`` is searched only if the model's connector gives the select layer's whole map."""
    from ..assets.vqa import TASKS, samples
    from ..core.budget import check_keep_ratio

    if cfg.task not in TASKS:
        raise StageError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    if cfg.model != "minillava":
        raise StageError(f"unknown VLM {cfg.model!r}; the bundled one is 'minillava'")
    if not is_int(cfg.n) or cfg.n < 1 or not is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise BudgetError("n and batch_size must be positive integers")
    ratio = check_keep_ratio("vflowopt", cfg.keep_ratio)
    space = check_space(cfg.space)
    _optuna()
    if cfg.out is not None and Path(cfg.out).parent.exists() and not Path(cfg.out).parent.is_dir():
        raise StageError(f"out {cfg.out}: {Path(cfg.out).parent} is not a folder")
    if model is None:
        from ..assets.minillava import load_vlm

        model, processor = load_vlm(cfg.model)
    data = samples(cfg.task, "calib", cfg.n, cfg.seed)
    batches = [processor(images=[s["image"] for s in data[i:i + cfg.batch_size]],
                         text=[s["question"] for s in data[i:i + cfg.batch_size]])
               for i in range(0, len(data), cfg.batch_size)]
    ev = LastTokenEvaluator(model, batches, keep_ratio=ratio)
    default_score = ev(dict.fromkeys(SEARCHED))  # the probe: the method's defaults, and what its scoring reads
    if ev.scored_with == "[CLS] row" and "t" in space:
        space.pop("t")
        log("the connector gives the tower's [CLS] row, not its whole attention map: t has no effect, searching a")
    side = math.isqrt(int(getattr(processor, "num_image_tokens", 0) or 0))
    if "a" in space and side and space["a"][0] < side < space["a"][1]:  # a >= the side: one cell, all the same
        space["a"] = (space["a"][0], float(side))
        log(f"a >= {side} puts the whole {side} x {side} grid in one cell: searching a in [{space['a'][0]:g}, {side}]")
    if not space:
        raise ParameterError("vflowopt_search: nothing left to search (t has no effect here); add a to the space")
    log(f"vflowopt on {cfg.model}, keep_ratio={ratio:g}: {cfg.n} calibration questions of {cfg.task}; defaults score "
        f"{default_score:.4f} ({OBJECTIVE})")

    def line(entry: dict) -> None:
        if progress:
            what = ", ".join(f"{k}={entry[k]:.4g}" for k in space)
            log(f"  trial {entry['trial']}: {entry['score']:.4f} ({what}{', seen before' if entry['cached'] else ''})")

    result = vflowopt_search(ev, space=space, trials=cfg.trials, seed=cfg.seed, sampler=cfg.sampler,
                             startup=cfg.startup, progress=line)
    source = {"search": "vflowopt", "paper": ARXIV, "model": cfg.model, "task": cfg.task, "split": "calib",
              "calibration_n": cfg.n, "objective": OBJECTIVE, "keep_ratio": ratio, "trials": cfg.trials,
              "sampler": cfg.sampler, "seed": cfg.seed, "space": {k: list(v) for k, v in space.items()},
              "scored_with": ev.scored_with, "score": result.score, "default_score": default_score,
              "evaluations": ev.evaluations, "model_seconds": ev.seconds,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    log(f"found {', '.join(f'{k}={result.params[k]:.4g}' for k in space)}: {result.score:.4f} (defaults "
        f"{default_score:.4f}), {len(result.log)} trials, {ev.seconds:.0f} s in the model")
    if cfg.out is not None:
        save_params(cfg.out, result.params, keep_ratio=ratio, source=source)
        log(f"wrote {cfg.out}")
    return VFlowOptSearchResult(result.params, result.score, result.log)
