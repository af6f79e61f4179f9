"""``tokenreduce search-schedule``: search an in-LLM method's per-layer schedule on the mini-LLaVA's calibration split.

`CalibrationEvaluator` scores a schedule: the method (FastV, PyramidDrop, any `LayerDropMethod`)
runs it on ``n`` questions of the task's ``"calib"`` split (`assets.vqa`, disjoint from the
``"test"`` questions ``tokenreduce bench vlm`` reports on), each prompt prefilled as ``generate``
prefills it (`bench.vlm.prefill`), and the first answer token is scored:

* ``objective="accuracy"``: the first token is the first token of the reference answer (lower-case,
  capitalised, or after a space), the first-token version of the benchmark's first-word scoring;
* ``objective="agreement"``: the first token equals the unreduced model's on the same prompt.

`CalibrationEvaluator.flops` is a schedule's analytic language-model prefill FLOPs as a fraction
of the unreduced model's, at the calibration prompts' mean length (`runtime.in_llm.
schedule_prefill_flops`, the count the attachment reports). For P-Sigmoid, ``budget`` is a
``keep_ratio`` (the fraction of visual tokens kept, averaged over the layers): the FLOPs budget
is what the method's own schedule at that ``keep_ratio`` costs, so the searched schedule and the
method's fixed one compare at the same FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..core.errors import BudgetError, StageError
from ..core.schedule import LayerSchedule
from .schedules import SearchResult, g_search, p_sigmoid_search

SEARCHES = {"g": "g-search", "g-search": "g-search", "p-sigmoid": "p-sigmoid"}
OBJECTIVES = ("accuracy", "agreement")


@dataclass
class SearchConfig:
    method: str = "fastv"
    search: str = "g"  # "g" (G-Search) or "p-sigmoid"
    task: str = "scenes"
    n: int = 64  # calibration questions
    budget: float | None = None  # p-sigmoid: a keep_ratio; the FLOPs of the method's own schedule at it
    tolerance: float | None = None  # g: the calibration score drop allowed (default 0)
    trials: int | None = None  # p-sigmoid: optimiser trials (default 30)
    layers: Sequence[int] | None = None  # g: candidate drop layers (default all)
    objective: str = "accuracy"
    sampler: str = "gp"  # p-sigmoid: "gp" or "tpe"
    seed: int = 0
    batch_size: int = 16
    model: str = "minillava"
    method_params: dict = field(default_factory=dict)
    out: str | None = "schedule.json"


def check_config(cfg: SearchConfig) -> SearchConfig:
    """Usage errors (`StageError`, `BudgetError`, `MissingDependencyError`), before any model loads."""
    from ..assets.vqa import TASKS
    from ..bench.vlm import schedule_method_names
    from ..core.registry import list_methods

    in_llm = schedule_method_names()
    stages = {i.name: i.stage for i in list_methods()}
    if cfg.method not in stages:
        raise StageError(f"unknown method {cfg.method!r}; schedules are searched for in-LLM methods: "
                         f"{', '.join(in_llm)}")
    if cfg.method not in in_llm:
        raise StageError(f"method {cfg.method!r} works at the {stages[cfg.method]} stage with no per-layer schedule; "
                         f"schedules are searched for in-LLM methods: {', '.join(in_llm)}")
    if cfg.search not in SEARCHES:
        raise StageError(f"unknown search {cfg.search!r}; choose g (G-Search: fewest tokens per layer with the "
                         "calibration score held) or p-sigmoid (a sigmoid schedule tuned for a FLOPs budget)")
    search = SEARCHES[cfg.search]
    if cfg.task not in TASKS:
        raise StageError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    if cfg.model != "minillava":
        raise StageError(f"unknown VLM {cfg.model!r}; the bundled one is 'minillava'")
    if cfg.objective not in OBJECTIVES:
        raise StageError(f"unknown objective {cfg.objective!r}; choose accuracy or agreement")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise BudgetError("--n and --batch-size must be positive integers")
    if search == "g-search":
        if cfg.budget is not None:
            raise BudgetError("--budget is P-Sigmoid's (a FLOPs budget); G-Search keeps the fewest tokens that hold "
                              "the calibration score: use --tolerance for the score drop allowed, or --search "
                              "p-sigmoid")
        if cfg.trials is not None:
            raise BudgetError("--trials is P-Sigmoid's; G-Search's evaluations follow from the layers and tokens")
        if cfg.tolerance is not None and not cfg.tolerance >= 0:
            raise BudgetError(f"--tolerance must be >= 0 (the calibration score drop allowed); got {cfg.tolerance}")
        if cfg.layers is not None and (not cfg.layers or min(cfg.layers) < 1
                                       or list(cfg.layers) != sorted(set(cfg.layers))):
            raise BudgetError(f"--layers must be distinct ascending drop layers >= 1; got {list(cfg.layers)}")
    else:
        if cfg.budget is None:
            raise BudgetError("--search p-sigmoid needs --budget: a keep_ratio in (0, 1) whose FLOPs (the method's own "
                              "schedule at that keep_ratio) the searched schedule may spend, e.g. --budget 0.25")
        if not 0.0 < cfg.budget < 1.0:
            raise BudgetError(f"--budget {cfg.budget:g} is out of range: a keep_ratio in (0, 1), e.g. --budget 0.25")
        if cfg.tolerance is not None or cfg.layers is not None:
            raise BudgetError("--tolerance and --layers are G-Search's; P-Sigmoid takes --budget and --trials")
        if cfg.trials is not None and cfg.trials < 1:
            raise BudgetError(f"--trials must be a positive integer; got {cfg.trials}")
        if cfg.sampler not in ("gp", "tpe"):
            raise StageError(f"unknown sampler {cfg.sampler!r}; choose gp or tpe")
        from .schedules import _optuna

        _optuna()  # a missing optimiser says what to install now, not after the model loads
    if cfg.out is not None:
        parent = Path(cfg.out).parent
        if parent.exists() and not parent.is_dir():
            raise StageError(f"--out {cfg.out}: {parent} is not a folder")
    return cfg


def _first_token_ids(tokenizer, answer: str) -> set[int]:
    ids = set()
    for word in {answer, answer.capitalize(), " " + answer, " " + answer.capitalize()}:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if enc:
            ids.add(int(enc[0]))
    return ids


class CalibrationEvaluator:
    """``evaluate(schedule) -> score`` on calibration questions, for one in-LLM method (see the module docstring)."""

    def __init__(self, model, processor, samples: list[dict], method: str, method_params: dict | None = None,
                 objective: str = "accuracy", batch_size: int = 16):
        from ..families.decoders import decoder_info, find_decoder

        if objective not in OBJECTIVES:
            raise StageError(f"unknown objective {objective!r}; choose accuracy or agreement")
        self.model, self.processor, self.samples = model, processor, samples
        self.name, self.params, self.objective = method, dict(method_params or {}), objective
        batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
        self.inputs = [processor(images=[s["image"] for s in b], text=[s["question"] for s in b]) for b in batches]
        self.targets = [_first_token_ids(processor.tokenizer, s["answer"]) for s in samples]
        fam, backbone = find_decoder(model)
        self.info = decoder_info(fam, backbone, ())
        self.num_layers = self.info.num_layers
        self.mlp_size = backbone.config.intermediate_size
        self.visual_tokens = int(processor.num_image_tokens)
        lengths = torch.cat([x["attention_mask"].sum(-1) for x in self.inputs]).float()
        self.length = float(lengths.mean())
        self._scorer = self.method([(1, 1.0)])  # its scoring_flops (the same whatever the schedule)
        self.evaluations = 0
        self.seconds = 0.0
        self.full_tokens = self._first_tokens(None)
        self.full_score = self._score(self.full_tokens)

    def method(self, schedule):
        import tokenreduce

        return tokenreduce.get_method(self.name, schedule=schedule, **self.params)

    def _first_tokens(self, method) -> torch.Tensor:
        from ..bench.vlm import prefill

        t0 = time.perf_counter()
        out = [prefill(self.model, x, method).logits[:, -1].argmax(-1) for x in self.inputs]
        self.seconds += time.perf_counter() - t0
        return torch.cat(out)

    def _score(self, tokens: torch.Tensor) -> float:
        if self.objective == "agreement":
            return float((tokens == self.full_tokens).float().mean())
        return sum(int(t) in want for t, want in zip(tokens.tolist(), self.targets)) / len(self.targets)

    def __call__(self, schedule: LayerSchedule) -> float:
        if not schedule.drops:
            return self.full_score
        self.evaluations += 1
        return self._score(self._first_tokens(self.method(schedule)))

    def flops(self, schedule: LayerSchedule) -> float:
        """Analytic language-model prefill FLOPs under ``schedule`` / the unreduced model's (mean prompt length)."""
        from ..runtime.in_llm import schedule_prefill_flops

        mine, full = schedule_prefill_flops(schedule.drops, self._scorer, self.info, self.mlp_size, self.length,
                                            self.visual_tokens)
        return mine / full

    def native(self, keep_ratio: float) -> LayerSchedule:
        """The method's own schedule at ``keep_ratio`` on this model."""
        import tokenreduce

        method = tokenreduce.get_method(self.name, keep_ratio=keep_ratio, **self.params)
        return LayerSchedule(tuple(method.schedule(self.info)), self.num_layers, self.visual_tokens)


def run_schedule_search(cfg: SearchConfig, model=None, processor=None, log: Callable[[str], None] = print,
                        progress: bool = True) -> SearchResult:
    """Search ``cfg.method``'s schedule on the calibration split, save it to ``cfg.out`` (if set) and return it."""
    from ..assets.vqa import samples

    cfg = check_config(cfg)
    search = SEARCHES[cfg.search]
    if model is None:
        from ..assets.minillava import load_vlm

        model, processor = load_vlm(cfg.model)
    data = samples(cfg.task, "calib", cfg.n, cfg.seed)
    ev = CalibrationEvaluator(model, processor, data, cfg.method, cfg.method_params, cfg.objective, cfg.batch_size)
    log(f"{cfg.method} on {cfg.model}: {ev.num_layers} layers, {ev.visual_tokens} visual tokens, {cfg.n} calibration "
        f"questions of {cfg.task}; unreduced {cfg.objective} {ev.full_score:.3f}")
    source = {"method": cfg.method, "method_params": cfg.method_params, "model": cfg.model, "task": cfg.task,
              "split": "calib", "calibration_n": cfg.n, "objective": cfg.objective, "seed": cfg.seed,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def line(entry: dict) -> None:
        if progress:
            what = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                             if k not in ("evaluation", "drops", "score"))
            log(f"  evaluation {entry['evaluation']}: {cfg.objective} {entry['score']:.3f} ({what}; "
                f"{len(entry['drops'])} drops)")

    if search == "g-search":
        result = g_search(ev, ev.num_layers, ev.visual_tokens, tolerance=cfg.tolerance or 0.0, layers=cfg.layers,
                          source=source, progress=line)
    else:
        native = ev.native(cfg.budget)
        budget = ev.flops(native)
        log(f"budget: {cfg.method}'s own schedule at keep_ratio={cfg.budget:g} ({native.describe()}) costs "
            f"{budget:.4f} of the unreduced prefill FLOPs")
        source["params"] = {"keep_ratio_budget": cfg.budget, "budget_schedule": [list(d) for d in native.drops]}
        result = p_sigmoid_search(ev, ev.num_layers, ev.flops, budget, trials=cfg.trials or 30, seed=cfg.seed,
                                  visual_tokens=ev.visual_tokens, sampler=cfg.sampler, source=source, progress=line)
    schedule = result.schedule
    extra = {"flops_ratio": ev.flops(schedule), "mean_kept": schedule.mean_kept(), "full_score": ev.full_score,
             "model_seconds": ev.seconds}
    schedule = LayerSchedule(schedule.drops, schedule.num_layers, schedule.visual_tokens, {**schedule.source, **extra})
    log(f"found {schedule.describe()}: {cfg.objective} {schedule.source['score']:.3f} (unreduced {ev.full_score:.3f}), "
        f"mean visual tokens kept {schedule.mean_kept():.3f}, prefill FLOPs x{extra['flops_ratio']:.3f}, "
        f"{len(result.log)} evaluations")
    if cfg.out is not None:
        schedule.save(cfg.out)
        log(f"wrote {cfg.out}")
    return SearchResult(schedule, result.log)
