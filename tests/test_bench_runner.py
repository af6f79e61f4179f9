"""Tests for tokenreduce.bench.runner: the grid, the per-pair spread and its noisy flag (no real clocks), the loop."""

from __future__ import annotations

import itertools
import json
import statistics
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce
from tokenreduce.bench import runner, timing
from tokenreduce.bench.report import markdown_table
from tokenreduce.bench.runner import (FULL, NOISY_SPREAD, Cell, PairedTimer, SpreadColumn, Task, Unit, build_grid,
                                      pair_spread, spread_fields)

ratios = st.lists(st.floats(0.05, 20.0, allow_nan=False, allow_infinity=False), min_size=2, max_size=12)


# ---------------------------------------------------------------------------- the spread and the noisy flag
@settings(max_examples=200, deadline=None)
@given(ratios)
def test_noisy_is_max_minus_min_over_median_above_a_quarter(pairs):
    s = pair_spread(pairs)
    expected = (max(pairs) - min(pairs)) / statistics.median(pairs)
    assert s["spread"] == pytest.approx(expected) and s["spread"] >= 0
    assert s["noisy"] == (s["spread"] > NOISY_SPREAD)
    assert (s["min"], s["max"], s["pairs"]) == (min(pairs), max(pairs), pairs)


@settings(max_examples=100, deadline=None)
@given(ratios, st.floats(0.01, 100.0), st.randoms())
def test_spread_ignores_scale_and_order(pairs, scale, rnd):
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    a, b = pair_spread(pairs), pair_spread([scale * p for p in shuffled])
    assert b["spread"] == pytest.approx(a["spread"], rel=1e-9, abs=1e-12)
    # scaling can move a value sitting exactly on the threshold by a rounding error; elsewhere the flag holds
    if abs(a["spread"] - NOISY_SPREAD) > 1e-9:
        assert a["noisy"] == b["noisy"]


@given(st.floats(0.1, 10.0), st.integers(2, 10))
def test_agreeing_pairs_are_not_noisy(r, n):
    assert pair_spread([r] * n)["spread"] == 0 and not pair_spread([r] * n)["noisy"]


def test_threshold_and_too_few_pairs():
    assert not pair_spread([1.0, 1.25])["noisy"]  # (1.25 - 1) / 1.125 = 0.22
    assert pair_spread([1.0, 1.3])["noisy"]  # 0.3 / 1.15 = 0.26
    # the observed demo case: a 2.06x speedup whose two pairs were 1.7x and 2.45x
    assert pair_spread([1.7, 2.45])["noisy"]
    assert pair_spread([2.0]) == {"pairs": [2.0], "min": 2.0, "max": 2.0, "spread": None, "noisy": False}
    assert pair_spread([None, 1.5])["spread"] is None and pair_spread([])["min"] is None
    f = spread_fields("speedup", [1.0, None, 2.0])
    assert f["speedup_pairs"] == [1.0, 2.0] and f["speedup_spread"] == pytest.approx(2 / 3) and f["speedup_noisy"]


def test_spread_column_flags_only_noisy_rows():
    rows = [{"method": "a", "speedup": 1.72, **spread_fields("speedup", [1.70, 1.74])},
            {"method": "b", "speedup": 2.06, **spread_fields("speedup", [1.70, 2.45])},
            {"method": "c", "speedup": None}]
    lines = markdown_table(rows, [runner.Column("method"), SpreadColumn("speedup", "speedup", ".2f")]).splitlines()
    assert "1.72 |" in lines[2] and "noisy" not in lines[2]
    assert "2.06 (noisy: 1.70–2.45)" in lines[3]
    assert "—" in lines[4]


def _fake_clock(monkeypatch, durations):
    """``timing``'s clock advances only when a timed function says how long it 'took'."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return lambda name: (lambda: now.__setitem__(0, now[0] + next(durations[name])))


def test_paired_timer_reports_the_spread_of_fake_pairs(monkeypatch):
    # full model 1 s per batch; the method 0.5 s, then 0.4375 s, then 0.5 s: pairs 2, 16/7, 2
    tick = _fake_clock(monkeypatch, {"ref": itertools.repeat(1.0), "cand": iter([9.0, 0.5, 0.4375, 0.5])})
    timer = PairedTimer(tick("ref"), items=4, repeats=3, warmup=1, device="cpu", unit="img")
    full = timer.full()
    assert full["img_per_s"] == 4.0 and full["speedup"] == 1.0
    row = timer.paired(tick("cand"))  # the first candidate call (9 s) is the untimed warm-up
    assert row["speedup_pairs"] == pytest.approx([2.0, 16 / 7, 2.0]) and row["speedup"] == pytest.approx(2.0)
    assert row["speedup_spread"] == pytest.approx(1 / 7) and not row["speedup_noisy"]
    assert row["full_img_per_s_paired"] == 4.0 and row["batch_times_s"] == [0.5, 0.4375, 0.5]
    rows = [{"method": FULL, **full}, {"method": "m", **row}]
    timer.finish(rows)
    assert rows[0]["batch_times_s"] == [1.0] * 6 and rows[0]["full_img_per_s_min"] == rows[0]["full_img_per_s_max"]


def test_paired_timer_flags_disagreeing_fake_pairs(monkeypatch):
    tick = _fake_clock(monkeypatch, {"ref": iter([1.0, 2.0]), "cand": iter([0.5, 0.5, 0.5])})
    row = PairedTimer(tick("ref"), items=1, repeats=2, warmup=1).paired(tick("cand"))
    assert row["speedup_pairs"] == [2.0, 4.0] and row["speedup_noisy"]  # (4 - 2) / 3 = 0.67


# ---------------------------------------------------------------------------- the grid
def test_checks_and_grid():
    with pytest.raises(tokenreduce.StageError, match="known encoder methods: .*tome"):
        runner.check_methods(["tome", "h2o"], "encoder", "in a vision encoder", "no full")
    with pytest.raises(tokenreduce.StageError, match="no full"):
        runner.check_methods(["none"], "encoder", "in a vision encoder", "no full")
    with pytest.raises(tokenreduce.StageError, match="twice"):
        runner.check_methods(["tome", "tome"], "encoder", "in a vision encoder", "no full")
    with pytest.raises(tokenreduce.BudgetError, match="listed twice"):
        runner.check_keep_ratios([0.5, 0.5], "ratio", "a keep_ratio", "--ratios 0.5")
    with pytest.raises(tokenreduce.BudgetError, match=r"ratio 0 is out of range: a ratio is x, e.g. --r 1"):
        runner.check_keep_ratios([0], "ratio", "x", "--r 1")
    grid = build_grid(["tome", "evit"], [0.75, 0.5], log=lambda m: None)
    assert [(c.method, c.budget) for c in grid.cells] == [("tome", 0.75), ("tome", 0.5), ("evit", 0.75),
                                                          ("evit", 0.5)]
    assert all(not c.full and c.obj.budget.ratio == c.budget for c in grid.cells) and runner.FULL_CELL.full
    assert Cell("tome", 0.5, object()) == Cell("tome", 0.5, object())  # cells key results by (method, budget)


def test_method_params_and_text():
    m = tokenreduce.get_method("snapkv", keep_ratio=0.25, window_size=8)
    assert runner.method_params(m)["window_size"] == 8 and "budget" not in runner.method_params(m)
    assert "keep_ratio" not in runner.params_text(m) and "window_size=8" in runner.params_text(m)


def test_environment_names_versions_and_threads():
    env = runner.environment("cpu")
    assert env["dtype"] == "float32" and env["threads"] >= 1 and env["torch"] and env["python"]
    assert "RSS" in env["mem_kind"]


# ---------------------------------------------------------------------------- the loop, on a task without a model
class _Toy(Task):
    """Two groups of two units (keys "x" and "y"); a cell's score is its budget, its time the unit's index."""

    bench = "toy"

    def __init__(self):
        self.calls = []

    def header(self, grid):
        return {"skipped": grid.skipped}

    def groups(self):
        return [(g, [Unit("x", 1), Unit("y", 2), Unit("x", 3)]) for g in ("g1", "g2")]

    def run(self, group, unit, cell):
        self.calls.append((group, unit.data, cell.method))
        return {"score": cell.budget, "t": unit.data * (0.5 if not cell.full else 1.0)}

    def row(self, group, key, cell, runs, full_runs):
        return {"group": group, "key": key, "method": cell.method, "n": len(runs),
                **spread_fields("time_ratio", [r["t"] / f["t"] for r, f in zip(runs, full_runs)])}

    def report(self, rows, out, header):
        (out / "results.md").write_text("toy")


def test_run_grid_order_rows_and_files(tmp_path):
    task = _Toy()
    grid = runner.Grid([Cell("a", 0.5, object()), Cell("b", 0.25, object())], skipped=[{"method": "c", "reason": "r"}])
    lines = []
    rows = runner.run_grid(task, grid, tmp_path, {"model": "m"}, progress=False, log=lines.append)
    # per unit: the full model first, then every cell, side by side
    assert task.calls[:6] == [("g1", 1, FULL), ("g1", 1, "a"), ("g1", 1, "b"), ("g1", 2, FULL), ("g1", 2, "a"),
                              ("g1", 2, "b")]
    # a key's rows come after its last unit: "y" (unit 2) before "x" (unit 3)
    assert [(r["group"], r["key"], r["method"], r["n"]) for r in rows[:6]] == [
        ("g1", "y", FULL, 1), ("g1", "y", "a", 1), ("g1", "y", "b", 1),
        ("g1", "x", FULL, 2), ("g1", "x", "a", 2), ("g1", "x", "b", 2)]
    assert len(rows) == 12 and all(r["time_ratio_pairs"] == [0.5] * r["n"] for r in rows if r["method"] != FULL)
    assert all(r["bench"] == "toy" and r["model"] == "m" and r["run_s"] >= 0 and r["timestamp"] for r in rows)
    back = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert back[0]["record"] == "header" and back[0]["skipped"] == grid.skipped and "loadavg_end" in back[0]
    assert len(back) == 13 and (tmp_path / "results.md").read_text() == "toy"


def test_a_budget_a_method_cannot_reach_on_the_model_skips_that_cell_only():
    """PyramidDrop's quarter-point stages on a 3-layer language model cannot keep less than 1/3 of the visual
    tokens on average, nor FastV at k=2 less than 2/3: their 0.2 cells are skipped with the reason, 0.8 runs."""
    from tiny_vlm import tiny_vlm

    grid = runner.build_grid(["pyramiddrop", "fastv"], [0.8, 0.2], log=lambda _: None)
    kept = runner.check_attachable(tiny_vlm("llava"), grid, log=lambda _: None)
    assert [(c.method, c.budget) for c in kept.cells] == [("pyramiddrop", 0.8), ("fastv", 0.8)]
    assert [(s["method"], s["keep_ratio"]) for s in kept.skipped] == [("pyramiddrop", 0.2), ("fastv", 0.2)]
    assert all("keep_ratio=0.2" in s["reason"] for s in kept.skipped)


def test_a_pipeline_cell_composes_a_connector_method_before_an_in_llm_method_at_its_own_schedule():
    """``visionzip+fastv @ b``: FastV at its native schedule (mean kept m over the layers), VisionZip keeping b / m
    of each image, so that the language model keeps b of the image's visual tokens on average; a budget above what
    the in-LLM schedule keeps is skipped with its reason, and a pipeline written the wrong way round is refused."""
    from tiny_vlm import tiny_vlm

    from tokenreduce.bench.vlm import check_methods, pipeline_cells
    from tokenreduce.families.decoders import decoder_info, find_decoder

    model = tiny_vlm("llava")
    fastv = tokenreduce.get_method("fastv")
    later = fastv.mean_kept(fastv.schedule(decoder_info(*find_decoder(model), ())), model.config.text_config
                            .num_hidden_layers)
    grid = pipeline_cells(model, ["visionzip+fastv"], [0.5, 0.99], per_image=16, log=lambda _: None)
    assert [(c.method, c.budget) for c in grid.cells] == [("visionzip+fastv", 0.5)]
    first, second = grid.cells[0].obj
    assert first.name == "visionzip" and second.name == "fastv" and first.budget.ratio == pytest.approx(0.5 / later)
    assert grid.skipped[0]["keep_ratio"] == 0.99 and "own schedule keeps" in grid.skipped[0]["reason"]
    assert check_methods(["visionzip+fastv", "fastv"]) == ["visionzip+fastv", "fastv"]
    for bad in ["fastv+visionzip", "visionzip+fastv+fastv", "visionzip+tome"]:
        with pytest.raises(tokenreduce.StageError, match="write first\\+in_llm"):
            check_methods([bad])
    with tokenreduce.apply(model, first, second):  # they compose
        pass


def test_schedule_runs_refuse_a_method_that_ranks_no_tokens():
    from tokenreduce.bench.vlm import check_schedule_methods, schedule_method_names

    assert "fastv" in schedule_method_names() and "yopo" not in schedule_method_names()
    with pytest.raises(tokenreduce.StageError, match="yopo cannot run a per-layer schedule"):
        check_schedule_methods(["fastv", "yopo"])
