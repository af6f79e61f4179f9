"""A benchmark run that can stop and go on: every (unit, cell) result is saved as it finishes.

A long run (hundreds of questions x a dozen cells on a CPU) can outlive the machine's session.
`run_grid` appends each result a resumable task returns to ``out/runs.jsonl``; a later run with
``resume=True`` and the same *fingerprint* (what makes results comparable: task, samples, batch
size, model, ...) reads them back and runs only what is missing, so the rows it writes are those
of one uninterrupted run. A different fingerprint is refused before any work: results of two
different runs are never mixed.

The file's first line is ``{"record": "checkpoint", "fingerprint": {...}}``; every other line is
``{"group", "unit", "cell", "run"}``, with ``cell`` from `cell_id` (the method's label, budget and
``describe()``, so the same name with other parameters is another cell).

A method's calibration (DyMU's thresholds) is part of the run too: `CalibrationStore` keeps each
calibrated state in ``out/calibration.json`` under the same fingerprint, so a resumed run reloads it
instead of calibrating again (minutes per budget on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core.errors import BenchError
from .report import to_jsonable

FILE = "runs.jsonl"


def cell_id(cell) -> str:
    """A cell's identity in the checkpoint: label, budget and every method's ``describe()`` (a task's own cells, such
    as a blind row, hold a plain marker)."""
    if cell.obj is None:
        return f"{cell.method}@{cell.budget!r}"
    methods = cell.obj if isinstance(cell.obj, tuple) else (cell.obj,)
    return f"{cell.method}@{cell.budget!r}: " + " + ".join(
        f"{m.name}({m.describe()})" if hasattr(m, "describe") else str(m) for m in methods)


class Checkpoint:
    """The saved results of a run in ``folder``; ``resume=False`` starts the file afresh."""

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, Any], resume: bool,
                 log: Callable[[str], None] = print):
        self.path = Path(folder) / FILE
        self.fingerprint = _as_read_back(fingerprint)
        self.done: dict[tuple[str, int, str], dict] = {}
        if resume and self.path.exists():
            self._load()
            log(f"resuming: {len(self.done)} saved results in {self.path}")
        else:
            if resume:
                log(f"resume: no {self.path} yet, starting afresh")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"record": "checkpoint", "fingerprint": self.fingerprint}) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        head = _check_header(self.path, lines[0] if lines else "{}", self.fingerprint)
        for n, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a line cut short by the interruption: that result runs again
                    break
                raise BenchError(f"{self.path} line {n} is not JSON; the checkpoint is damaged") from None
            self.done[(rec["group"], rec["unit"], rec["cell"])] = rec["run"]
        # rewrite without a cut-short last line, so appending goes on cleanly
        self.path.write_text("".join(json.dumps(x) + "\n" for x in
                                     [head] + [{"group": g, "unit": u, "cell": c, "run": r}
                                               for (g, u, c), r in self.done.items()]))

    def get(self, group: str, unit: int, cell: str) -> dict | None:
        return self.done.get((group, unit, cell))

    def put(self, group: str, unit: int, cell: str, run: dict) -> dict:
        """Save ``run`` and return it as it will read back (JSON types), so resumed and fresh rows are built alike."""
        run = json.loads(json.dumps(to_jsonable(run)))
        self.done[(group, unit, cell)] = run
        with self.path.open("a") as f:
            f.write(json.dumps({"group": group, "unit": unit, "cell": cell, "run": run}) + "\n")
        return run


def check_resumable(folder: str | Path, fingerprint: Mapping[str, Any]) -> None:
    """Refuse to resume a different run, before any work (loading, calibrating): the checks `Checkpoint` makes."""
    path = Path(folder) / FILE
    if path.exists():
        with path.open() as f:
            _check_header(path, f.readline(), _as_read_back(fingerprint))


def _check_header(path: Path, first_line: str, fingerprint: dict) -> dict:
    head = json.loads(first_line or "{}")
    if head.get("record") != "checkpoint":
        raise BenchError(f"{path} is not a benchmark checkpoint (no header line); move it away or choose "
                         "another output folder")
    if head.get("fingerprint") != fingerprint:
        old, new = head.get("fingerprint", {}), fingerprint
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k))
        raise BenchError(f"{path} holds the results of a different run ({diff}); resume it with the same "
                         "arguments, or choose another output folder (or drop --resume to start afresh)")
    return head


def _as_read_back(fingerprint: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(to_jsonable(dict(fingerprint))))


class CalibrationStore:
    """Calibrated method states of a run in ``folder/calibration.json``, keyed by the method before calibration
    (``name(describe())``); ``resume=True`` reads those saved under the same fingerprint, else the file starts
    afresh (a state never crosses into a run with other data or versions)."""

    FILE = "calibration.json"

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, Any], resume: bool):
        self.path = Path(folder) / self.FILE
        self.fingerprint = _as_read_back(fingerprint)
        self.states: dict[str, dict] = {}
        if resume and self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.states = saved.get("states", {})

    @staticmethod
    def key(method) -> str:
        return f"{method.name}({method.describe()})"

    def get(self, key: str) -> dict | None:
        return self.states.get(key)

    def put(self, key: str, state: dict) -> None:
        self.states[key] = json.loads(json.dumps(to_jsonable(state)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"fingerprint": self.fingerprint, "states": self.states}, indent=1) + "\n")
