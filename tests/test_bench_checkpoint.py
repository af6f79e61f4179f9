"""Tests for tokenreduce.bench.checkpoint: an interrupted run resumed gives the rows of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce.bench import runner
from tokenreduce.bench.checkpoint import FILE, cell_id
from tokenreduce.bench.runner import FULL, Cell, Task, Unit
from tokenreduce.core.errors import BenchError


class _Method:
    def __init__(self, name, **params):
        self.name, self.params = name, params

    def describe(self):
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


class _Interrupted(Exception):
    pass


class _Counting(Task):
    """Units of one group; a run's result depends on (unit, cell) only; ``stop_after`` runs raise (an interruption)."""

    bench = "counting"

    def __init__(self, units=5, seed=0, stop_after=None):
        self.units, self.seed, self.stop_after, self.calls = units, seed, stop_after, []

    def fingerprint(self):
        return {"units": self.units, "seed": self.seed}

    def groups(self):
        return [("g", [Unit("all", i) for i in range(self.units)])]

    def run(self, group, unit, cell):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise _Interrupted
        self.calls.append((unit.data, cell.method))
        return {"correct": [(unit.data * 7 + len(cell.method) + self.seed) % 3 == 0], "n": 1,
                "per_layer": (1.0, 0.5), "flops": unit.data * cell.budget}

    def row(self, group, key, cell, runs, full_runs):
        return {"method": cell.method, "budget": cell.budget, "accuracy": sum(sum(r["correct"]) for r in runs),
                "n": sum(r["n"] for r in runs), "flops": sum(r["flops"] for r in runs),
                "per_layer": [list(r["per_layer"]) for r in runs]}


def _grid():
    return runner.Grid([Cell("a", 0.5, _Method("a", keep_ratio=0.5)), Cell("b", 0.25, _Method("b", k=2))])


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("timestamp", "run_s", "loadavg_start", "loadavg_end")}
            for r in rows]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 14), st.integers(1, 5))
def test_a_resumed_run_equals_an_uninterrupted_one_and_runs_only_what_is_missing(tmp_path_factory, stop, units):
    total = units * 3  # the full model + 2 cells per unit
    whole = _Counting(units)
    expected = runner.run_grid(whole, _grid(), tmp_path_factory.mktemp("whole"), {}, progress=False, log=lambda m: None)
    out = tmp_path_factory.mktemp("cut")
    first = _Counting(units, stop_after=stop)
    if stop < total:
        with pytest.raises(_Interrupted):
            runner.run_grid(first, _grid(), out, {}, progress=False, log=lambda m: None)
    else:
        runner.run_grid(first, _grid(), out, {}, progress=False, log=lambda m: None)
    again = _Counting(units)
    rows = runner.run_grid(again, _grid(), out, {}, progress=False, log=lambda m: None, resume=True)
    assert _strip(rows) == _strip(expected)
    assert len(again.calls) == total - min(stop, total)  # nothing ran twice
    assert set(again.calls).isdisjoint(first.calls) and len(first.calls) + len(again.calls) == total


def test_without_resume_the_saved_results_start_afresh(tmp_path):
    runner.run_grid(_Counting(2), _grid(), tmp_path, {}, progress=False, log=lambda m: None)
    task = _Counting(2)
    runner.run_grid(task, _grid(), tmp_path, {}, progress=False, log=lambda m: None)
    assert len(task.calls) == 6
    lines = (tmp_path / FILE).read_text().splitlines()
    assert json.loads(lines[0]) == {"record": "checkpoint", "fingerprint": {"units": 2, "seed": 0}} and len(lines) == 7


def test_another_runs_checkpoint_is_refused_before_any_file_changes(tmp_path):
    runner.run_grid(_Counting(2), _grid(), tmp_path, {}, progress=False, log=lambda m: None)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(BenchError, match=r"different run \(seed: 0 -> 1\).*same arguments"):
        runner.run_grid(_Counting(2, seed=1), _grid(), tmp_path, {}, progress=False, log=lambda m: None, resume=True)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_line_cut_short_by_the_interruption_runs_again(tmp_path):
    runner.run_grid(_Counting(2), _grid(), tmp_path, {}, progress=False, log=lambda m: None)
    path = tmp_path / FILE
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 20])  # the last result half written
    task = _Counting(2)
    runner.run_grid(task, _grid(), tmp_path, {}, progress=False, log=lambda m: None, resume=True)
    assert task.calls == [(1, "b")]
    assert all(json.loads(x) for x in path.read_text().splitlines()) and len(path.read_text().splitlines()) == 7
    path.write_text(text.replace('"run"', '"run', 1))  # damage in the middle is not an interruption
    with pytest.raises(BenchError, match="damaged"):
        runner.run_grid(_Counting(2), _grid(), tmp_path, {}, progress=False, log=lambda m: None, resume=True)


def test_a_cell_is_known_by_its_parameters_and_a_new_cell_runs_in_full(tmp_path):
    assert cell_id(Cell("a", 0.5, _Method("a", k=2))) != cell_id(Cell("a", 0.5, _Method("a", k=3)))
    assert cell_id(runner.FULL_CELL) == f"{FULL}@1.0"
    runner.run_grid(_Counting(2), _grid(), tmp_path, {}, progress=False, log=lambda m: None)
    grid = runner.Grid(_grid().cells + [Cell("c", 0.1, _Method("c"))])
    task = _Counting(2)
    runner.run_grid(task, grid, tmp_path, {}, progress=False, log=lambda m: None, resume=True)
    assert task.calls == [(0, "c"), (1, "c")]


def test_a_task_without_a_fingerprint_cannot_resume(tmp_path):
    class Plain(_Counting):
        def fingerprint(self):
            return None

    with pytest.raises(ValueError, match="cannot resume"):
        runner.run_grid(Plain(1), _grid(), tmp_path, {}, progress=False, log=lambda m: None, resume=True)
