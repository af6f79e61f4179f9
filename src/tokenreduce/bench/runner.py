"""One runner for every benchmark family: the method x budget grid, timing, and the report files.

A family (``bench/vit.py``, ``bench/kv.py``, the coming vlm one) is a `Task`: it loads its
model and samples, runs one method (or the full model) on one unit of work, and turns the
runs of one (row key, method, budget) into a row. `run_grid` does the rest:

* the grid — `check_methods` / `check_keep_ratios` before anything loads, `build_grid`
  builds every method once (a bad parameter fails before minutes of work), `check_attachable`
  drops methods that refuse the model;
* the loop — per group (e.g. a context length) and unit of work (e.g. a sample in a
  setting), the full model first, then every cell of the grid on the same unit, side by side;
  a row is emitted as soon as its last unit ran, appended to ``results.jsonl`` (an
  interrupted run keeps it) and logged;
* timing — a task that times whole batches gives a `PairedTimer`: the full model is timed
  once, then alternately with each method batch by batch (`timing.measure_paired`), and each
  row gets its speedup with the spread of the per-pair speedups (`pair_spread`); tasks that
  time per sample report the same spread over their per-sample ratios (`spread_fields`);
* the report — the environment (`environment`, `loadavg`) in every row, ``run_s``, the JSON
  lines rewritten at the end, then the task's Markdown + Pareto plot (`write_markdown_report`,
  `plot.pareto_plot`; `SpreadColumn` flags noisy ratios in the tables).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch

from ..core.errors import BudgetError, StageError, UnsupportedModelError
from .checkpoint import Checkpoint, cell_id
from .report import Column, markdown_table, to_jsonable, write_jsonl
from .timing import Timing, measure_paired, measure_throughput

__all__ = ["FULL", "NOISY_SPREAD", "Cell", "FULL_CELL", "Grid", "Unit", "Task", "PairedTimer", "SpreadColumn",
           "method_names", "check_methods", "check_keep_ratios", "build_grid", "check_attachable", "method_params",
           "params_text", "progress_bar", "environment", "loadavg", "pair_spread", "spread_fields", "run_grid",
           "environment_note", "spread_note", "write_markdown_report"]

FULL = "none"  # the method name of the unreduced model's rows
NOISY_SPREAD = 0.25  # per-pair ratios spread wider than this (relative to their median): "noisy"


# ---------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method at one budget (keep_ratio). ``obj`` None: the full model."""

    method: str
    budget: float
    obj: Any = field(default=None, compare=False)

    @property
    def full(self) -> bool:
        return self.obj is None


FULL_CELL = Cell(FULL, 1.0, None)


@dataclass
class Grid:
    cells: list[Cell]
    skipped: list[dict] = field(default_factory=list)  # {"method", ["keep_ratio"], "reason"}


def method_names(stage: str) -> list[str]:
    from ..core.registry import list_methods

    return [i.name for i in list_methods(stage=stage)]


def check_methods(names: Sequence[str], stage: str, where: str, full_message: str,
                  full_names: Sequence[str] = (FULL,)) -> list[str]:
    """Registered methods of ``stage``, or a `StageError` naming the known ones.

    ``where``: how the error says where the stage works (e.g. "in a vision encoder");
    ``full_message``: the error for listing the full model (``full_names``), always measured anyway.
    """
    from ..core.registry import list_methods

    stages = {i.name: i.stage for i in list_methods()}
    known = ", ".join(method_names(stage))
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise StageError(f"no methods given; known {stage} methods: {known}")
    for n in names:
        if n in full_names:
            raise StageError(full_message)
        if n not in stages:
            raise StageError(f"unknown method {n!r}; known {stage} methods: {known}")
        if stages[n] != stage:
            raise StageError(f"method {n!r} works at the {stages[n]} stage, not {where}; known {stage} methods: {known}")
    if len(set(names)) != len(names):
        raise StageError(f"method listed twice: {', '.join(names)}")
    return names


def check_keep_ratios(values: Sequence[float], word: str, meaning: str, example: str) -> list[float]:
    """keep_ratios in (0, 1], at least one, none twice; a `BudgetError` otherwise.

    ``word``: what the command line calls them ("budget", "ratio"); ``meaning``: the sentence
    after "a <word> is"; ``example``: the flag with good values, e.g. ``--budgets 0.75,0.5``.
    """
    out = [float(v) for v in values]
    if not out:
        raise BudgetError(f"no {word}s given, e.g. {example}")
    for v in out:
        if not 0.0 < v <= 1.0:
            raise BudgetError(f"{word} {v:g} is out of range: a {word} is {meaning}, e.g. {example}")
    if len(set(out)) != len(out):
        raise BudgetError(f"{word} listed twice: {', '.join(f'{v:g}' for v in out)}")
    return out


def build_grid(names: Sequence[str], budgets: Sequence[float], skip_calibrated: bool = False,
               skip_bad_budgets: bool = False, log: Callable[[str], None] = print,
               params: Mapping[str, Mapping[str, Any]] | None = None) -> Grid:
    """Every (method, budget) cell, each method built by `tokenreduce.get_method` now (bad parameters fail early),
    with ``params[name]`` (extra keyword arguments) if given.

    ``skip_calibrated``: methods that need calibration are skipped (with the reason) instead of
    run; ``skip_bad_budgets``: a method refusing a keep_ratio (`BudgetError`) is skipped at that
    budget instead of failing the run.
    """
    import tokenreduce

    infos = {i.name: i for i in tokenreduce.list_methods()}
    cells, skipped = [], []
    for name in names:
        if skip_calibrated and infos[name].needs_calibration:
            skipped.append({"method": name, "reason": "needs calibration (not run by this benchmark)"})
            continue
        for b in budgets:
            try:
                cells.append(Cell(name, b, tokenreduce.get_method(name, keep_ratio=b, **(params or {}).get(name, {}))))
            except BudgetError as e:
                if not skip_bad_budgets:
                    raise
                skipped.append({"method": name, "keep_ratio": b, "reason": f"no keep_ratio budget: {e}"})
    for s in skipped:
        log(f"skipping {s['method']}" + (f" @ {s['keep_ratio']:g}" if "keep_ratio" in s else "") + f": {s['reason']}")
    return Grid(cells, skipped)


def as_methods(obj) -> tuple:
    """A cell's methods: one method, or a tuple of methods composed across stages (a pipeline)."""
    return obj if isinstance(obj, tuple) else (obj,)


def check_attachable(model, grid: Grid, log: Callable[[str], None] = print) -> Grid:
    """Attach each method once (no forward): an unsupported model fails now, a method that refuses it is skipped."""
    import tokenreduce

    refused: dict[str, str] = {}
    unreachable: list[dict] = []  # a budget the method cannot reach on this model (e.g. its layers): that cell only
    for cell in grid.cells:
        if cell.method in refused:
            continue
        try:
            with tokenreduce.apply(model, *as_methods(cell.obj)):
                pass
        except UnsupportedModelError:
            raise
        except BudgetError as e:
            unreachable.append({"method": cell.method, "keep_ratio": cell.budget, "reason": f"budget: {e}"})
            log(f"skipping {cell.method} @ {cell.budget:g}: {e}")
        except StageError as e:
            refused[cell.method] = str(e)
            log(f"skipping {cell.method}: refuses this model: {e}")
    skipped = grid.skipped + unreachable + [{"method": n, "reason": f"refuses this model: {r}"}
                                            for n, r in refused.items()]
    gone = {(u["method"], u["keep_ratio"]) for u in unreachable}
    cells = [c for c in grid.cells if c.method not in refused and (c.method, c.budget) not in gone]
    if not cells:
        raise StageError("no method left to run: " + "; ".join(f"{s['method']}: {s['reason']}" for s in skipped))
    return Grid(cells, skipped)


# ---------------------------------------------------------------------------- row pieces
def method_params(method, drop: Sequence[str] = ("budget",)) -> dict:
    """The method's public attributes (its parameters), JSON-ready, without ``drop``."""
    return to_jsonable({k: v for k, v in vars(method).items() if not k.startswith("_") and k not in drop})


def params_text(method) -> str:
    """``describe()`` without the budget, which has its own columns."""
    parts = [p.strip() for p in method.describe().split(",")]
    return ", ".join(p for p in parts if not p.startswith(("keep_ratio=", "keep_count="))) or "—"


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "run"):
    """A tqdm bar on stderr (a context manager with ``update``/``close``), or one that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: str | torch.device, model=None) -> dict:
    """Where the numbers were measured: device, dtype, threads, CPU/GPU and library versions."""
    import transformers

    import tokenreduce

    from .timing import memory_label

    param = next(iter(model.parameters()), None) if model is not None else None
    env = {"device": str(device), "dtype": str(param.dtype if param is not None else torch.float32).replace("torch.", ""),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenreduce": tokenreduce.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "mem_kind": memory_label(device)}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


# ---------------------------------------------------------------------------- timing and its spread
def pair_spread(ratios: Sequence[float | None]) -> dict:
    """The spread of per-pair ratios (a speedup, or a time ratio, measured once per pair).

    A pair is one reference measurement and one candidate measurement taken back to back
    (a batch of the full model then a batch of the method; or the full cache and the method
    on the same sample). With ``r_1..r_n`` the per-pair ratios (``None`` ones dropped):

        spread = (max(r) - min(r)) / median(r)

    and the ratio is **noisy** when ``spread > NOISY_SPREAD`` (0.25): its pairs disagree by
    more than 25 % of their typical value, so the machine's load changed under the
    measurement and the reported ratio may be off by about that much. Fewer than two pairs
    give no spread (``None``) and are never flagged. Returns ``{"pairs", "min", "max",
    "spread", "noisy"}``.
    """
    pairs = [float(r) for r in ratios if r is not None]
    if len(pairs) < 2:
        return {"pairs": pairs, "min": pairs[0] if pairs else None, "max": pairs[0] if pairs else None,
                "spread": None, "noisy": False}
    lo, hi, med = min(pairs), max(pairs), statistics.median(pairs)
    spread = (hi - lo) / med if med > 0 else float("inf")
    return {"pairs": pairs, "min": lo, "max": hi, "spread": spread, "noisy": spread > NOISY_SPREAD}


def spread_fields(key: str, ratios: Sequence[float | None]) -> dict:
    """``pair_spread`` as row fields: ``<key>_pairs``, ``<key>_pair_min``/``_max``, ``<key>_spread``, ``<key>_noisy``."""
    s = pair_spread(ratios)
    return {f"{key}_pairs": s["pairs"], f"{key}_pair_min": s["min"], f"{key}_pair_max": s["max"],
            f"{key}_spread": s["spread"], f"{key}_noisy": s["noisy"]}


@dataclass(frozen=True)
class SpreadColumn(Column):
    """A ratio column that flags a noisy ratio (see `pair_spread`) with its pairs' range: ``2.06 (noisy: 1.60–2.50)``."""

    def render(self, row: dict) -> str:
        text = super().render(row)
        if row.get(f"{self.key}_noisy") and row.get(self.key) is not None:
            fmt = self.fmt if isinstance(self.fmt, str) and self.fmt else ".2f"
            text += (f" (noisy: {format(row[f'{self.key}_pair_min'], fmt)}–"
                     f"{format(row[f'{self.key}_pair_max'], fmt)})")
        return text


def spread_note(what: str, pairs: str) -> str:
    """The report note for noisy ratios: ``what`` the ratios are called, ``pairs`` what one pair is."""
    return (f"{what} marked noisy: its per-pair values ({pairs}) disagree, (max - min) / median > {NOISY_SPREAD:g}; "
            "the cell shows their range. The machine's load changed while they were measured.")


class PairedTimer:
    """Batch throughput per cell, the full model timed alternately with each method.

    ``reference()`` runs one batch of the full model, ``items`` items (``unit``s) long.
    `full` times it alone first (warm-up, then ``repeats`` batches); `paired` times a
    method's batch function alternately with it (`timing.measure_paired`) and adds the
    spread of the per-pair speedups; `finish` gives the full row every full-model batch of
    the run, pooled, and the range of its paired throughputs.
    """

    def __init__(self, reference: Callable[[], object], items: int, repeats: int, warmup: int = 1,
                 device: str | torch.device = "cpu", unit: str = "img"):
        self.reference, self.items, self.repeats, self.warmup = reference, items, repeats, warmup
        self.device, self.unit = device, unit
        self.full_times: list[float] = []
        self.peak_mem_mb: float | None = None
        self.mem_kind = ""

    def fields(self, t: Timing, ref: Timing) -> dict:
        u = self.unit
        speedup = t.items_per_s / ref.items_per_s
        return {f"{u}_per_s": t.items_per_s, f"ms_per_{u}": t.ms_per_item, "speedup": speedup,
                "time_ratio": 1.0 / speedup, "batch_times_s": t.times, "peak_mem_mb": t.peak_mem_mb,
                "mem_kind": t.mem_kind}

    def full(self) -> dict:
        t = measure_throughput(self.reference, self.items, self.repeats, warmup=self.warmup, device=self.device)
        self.full_times += t.times
        self.peak_mem_mb, self.mem_kind = t.peak_mem_mb, t.mem_kind
        return self.fields(t, t)

    def paired(self, candidate: Callable[[], object]) -> dict:
        ref, t = measure_paired(self.reference, candidate, self.items, self.repeats, warmup=self.warmup,
                                device=self.device)
        self.full_times += ref.times
        return {**self.fields(t, ref), f"full_{self.unit}_per_s_paired": ref.items_per_s,
                **spread_fields("speedup", [r / c for r, c in zip(ref.times, t.times)])}

    def finish(self, rows: Sequence[dict]) -> None:
        u = self.unit
        pooled = Timing(items=self.items, times=self.full_times, peak_mem_mb=self.peak_mem_mb, mem_kind=self.mem_kind)
        paired = [r[f"full_{u}_per_s_paired"] for r in rows if f"full_{u}_per_s_paired" in r] or [pooled.items_per_s]
        for r in rows:
            if r.get("method") == FULL:
                r.update(self.fields(pooled, pooled))
                r[f"full_{u}_per_s_min"], r[f"full_{u}_per_s_max"] = min(paired), max(paired)


# ---------------------------------------------------------------------------- the task and the loop
@dataclass
class Unit:
    """One unit of work that every cell runs on (a sample in a setting; the whole test set).

    Runs of units with the same ``key`` within a group make one row per cell.
    """

    key: Hashable
    data: Any = None


class Task:
    """What a benchmark family supplies to `run_grid` (override what it needs)."""

    bench = "task"  # the "bench" field of every row
    outer_bar = True  # one progress tick per (unit, cell); False: the task shows its own bars
    timer: PairedTimer | None = None  # set (in `prepare`) to have every cell timed by batches

    def prepare(self, out: Path | None) -> None:
        """Slow set-up after the output folder exists (features, classifiers, samples files)."""

    def header(self, grid: Grid) -> dict | None:
        """A first JSON line describing the run (None: no header record)."""
        return None

    def groups(self) -> Iterable[tuple[Any, list[Unit]]]:
        """``(group, units)`` in run order; rows are made per group."""
        raise NotImplementedError

    def warmup(self, unit: Unit, cells: Sequence[Cell]) -> None:
        """Runs once, before the first unit (untimed)."""

    def fingerprint(self) -> dict | None:
        """What makes two runs' results comparable (task, samples, model, ...), for `checkpoint.Checkpoint`;
        None: the task's runs are not saved (they must then be JSON-ready dicts, and the same on reading back)."""
        return None

    def run(self, group: Any, unit: Unit, cell: Cell) -> dict:
        """One cell (``cell.full``: the unreduced model) on one unit; its measurements."""
        raise NotImplementedError

    def forward(self, cell: Cell) -> Callable[[], object]:
        """One timed batch of ``cell``'s model (with a `timer`); the full cell's is the timer's reference."""
        raise NotImplementedError

    def row(self, group: Any, key: Hashable, cell: Cell, runs: list[dict], full_runs: list[dict]) -> dict:
        """The row of ``cell`` over its ``runs`` (same units as ``full_runs``, the full model's)."""
        raise NotImplementedError

    def log_line(self, row: dict, full_row: dict) -> str | None:
        return None

    def report(self, rows: list[dict], out: Path, header: dict | None) -> None:
        """``results.md`` and plots (``results.jsonl`` is the runner's)."""


def run_grid(task: Task, grid: Grid, out: str | Path | None, common: dict, progress: bool = True,
             log: Callable[[str], None] = print, t_start: float | None = None, resume: bool = False) -> list[dict]:
    """Run ``task`` over the full model + ``grid`` and return its rows; with ``out``, write the report files.

    Every row gets ``common`` (with `environment`), the ``bench`` name, a timestamp and, at the
    end, ``run_s``; rows go to ``out/results.jsonl`` as they finish and the file is rewritten at
    the end, after the header record (if the task has one). ``t_start``: ``time.perf_counter()``
    when the run began (e.g. before the model loaded), for ``run_s``. A task with a `Task.fingerprint`
    saves every (unit, cell) result in ``out/runs.jsonl`` as it finishes; ``resume=True`` reads them back
    and runs only the missing ones (`checkpoint`).
    """
    t_start = time.perf_counter() if t_start is None else t_start
    load_start = loadavg()
    out = Path(out) if out is not None else None
    jsonl = None
    fingerprint = task.fingerprint() if out is not None else None
    if resume and fingerprint is None:
        raise ValueError(f"the {task.bench} bench cannot resume a run" if out is not None else
                         "resuming needs the output folder that holds the saved results")
    saved = Checkpoint(out, fingerprint, resume, log) if fingerprint is not None else None  # before files change
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "results.jsonl"
        jsonl.write_text("")  # rows are appended as they finish, so an interrupted run keeps them
    task.prepare(out)
    header = task.header(grid)
    if header is not None:
        header = {"record": "header", "bench": task.bench, **common, **header, "loadavg_start": load_start,
                  "started": _now()}
        if jsonl is not None:
            write_jsonl([header], jsonl)

    cells = [FULL_CELL] + list(grid.cells)
    groups = list(task.groups())
    total = sum(len(units) for _, units in groups) * len(cells)
    bar = progress_bar(progress and task.outer_bar, total, f"bench {task.bench}")
    rows: list[dict] = []
    first = True
    try:
        for group, units in groups:
            last = {u.key: i for i, u in enumerate(units)}  # a key's row is made after its last unit
            results: dict[tuple, list[dict]] = {}
            full_rows: dict[Hashable, dict] = {}
            for i, unit in enumerate(units):
                if first:
                    task.warmup(unit, grid.cells)
                    first = False
                for cell in cells:
                    run = saved.get(str(group), i, cell_id(cell)) if saved is not None else None
                    if run is None:
                        run = task.run(group, unit, cell)
                        if saved is not None:
                            run = saved.put(str(group), i, cell_id(cell), run)
                    results.setdefault((unit.key, cell), []).append(run)
                    bar.update(1)
                    if last[unit.key] != i:
                        continue
                    row = task.row(group, unit.key, cell, results[(unit.key, cell)], results[(unit.key, FULL_CELL)])
                    if task.timer is not None:
                        row.update(task.timer.full() if cell.full else task.timer.paired(task.forward(cell)))
                    row.update({**common, "bench": task.bench, "timestamp": _now()})
                    if cell.full:
                        full_rows[unit.key] = row
                    line = task.log_line(row, full_rows[unit.key]) if not cell.full else None
                    if line:
                        log(line)
                    rows.append(row)
                    if jsonl is not None:
                        write_jsonl([row], jsonl, append=True)
    finally:
        bar.close()

    if task.timer is not None:
        task.timer.finish(rows)
    elapsed, load_end = time.perf_counter() - t_start, loadavg()
    for r in rows:
        r["run_s"] = elapsed
        if header is None:
            r["loadavg_start"], r["loadavg_end"] = load_start, load_end
    if header is not None:
        header["run_s"], header["loadavg_end"] = elapsed, load_end
    if out is not None:
        write_jsonl(([header] if header is not None else []) + rows, jsonl)  # run time, the end's load, pooled timing
        task.report(rows, out, header)
    return rows


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- report pieces
def environment_note(row: dict, header: dict | None = None) -> str:
    """The last note of every report: versions, time, run length and the machine's load."""
    src = header or row
    load = ""
    if src.get("loadavg_start") and src.get("loadavg_end"):
        load = f"; load average {src['loadavg_start'][0]:.2f} at start, {src['loadavg_end'][0]:.2f} at end"
    return (f"torch {row.get('torch')}, transformers {row.get('transformers')}, tokenreduce {row.get('tokenreduce')}; "
            f"{row.get('timestamp')}; run {row.get('run_s', 0):.0f} s{load}.")


def write_markdown_report(path: str | Path, title: str, notes: Sequence[str],
                          tables: Sequence[tuple[str | None, Sequence[dict], Sequence[Column]]],
                          legend: str | None = None) -> Path:
    """``# title``, the notes as a list, then each table under its optional ``## heading``, then ``legend``."""
    parts = [f"# {title}\n"]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    for heading, rows, columns in tables:
        parts.append((f"## {heading}\n\n" if heading else "") + markdown_table(rows, columns) + "\n")
    if legend:
        parts.append(legend + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
