"""`tokenreduce bench vlm`'s tower methods, pipelines that start in the tower, and ``--param``."""

from __future__ import annotations

import json

import pytest

import tokenreduce
from tokenreduce.cli import main, parse_method_params


def test_tower_methods_are_the_encoder_methods_that_set_the_tokens_leaving_the_tower():
    from tokenreduce.bench.vlm import check_methods, first_stage_method, tower_method_names, vlm_method_names

    assert {"flowcut", "dymu", "dymu_vtu"} <= set(tower_method_names()) and "tome" not in tower_method_names()
    assert set(tower_method_names()) <= set(vlm_method_names())
    assert first_stage_method("flowcut", 0.25, 144).target_num == 36
    assert first_stage_method("flowcut", 0.1, 144).target_num == 14  # round(14.4)
    assert first_stage_method("dymu", 0.25, 144).r_total == 108  # merges leaving 36
    assert first_stage_method("dymu_vtu", 0.25, 144).tower.r_total == 108
    assert first_stage_method("flowcut", 1.0, 144).reduces_nothing
    assert first_stage_method("visionzip", 0.25, 144).budget.ratio == 0.25
    with pytest.raises(tokenreduce.BudgetError, match="under 1"):
        first_stage_method("flowcut", 0.003, 144)
    assert check_methods(["flowcut+flowcut_llm", "flowcut"]) == ["flowcut+flowcut_llm", "flowcut"]
    with pytest.raises(tokenreduce.StageError, match="not on visual tokens"):
        check_methods(["tome"])
    for bad in ["tome+fastv", "dymu_vtu+fastv"]:  # dymu_vtu is a language-model stage of its own
        with pytest.raises(tokenreduce.StageError, match="write first\\+in_llm"):
            check_methods([bad])


def test_bench_vlm_runs_a_tower_method_and_counts_the_tower_it_saved(tmp_path):
    """FlowCut in the tower of a tiny LLaVA with the mini-LLaVA's layout (16 tokens per 56 px image, 4 tower blocks,
    select layer -2: FlowCut reduces in blocks 0-1, blocks 2-3 run on what it left): the language model gets
    round(budget x 16) visual tokens, the projector's FLOPs shrink in proportion, the tower's are below the full
    model's by at least the two unhooked blocks' saving, and at budget 1.0 (nothing reduced) they equal the full
    model's. A pipeline starting in the tower composes with an in-LLM method. DyMU is calibrated on the calibration
    split for each budget; with virtual unmerging its cache keeps the whole prompt, without it only the merged rows."""
    from tiny_vlm import tiny_minillava

    from tokenreduce.bench.vlm import VLMBenchConfig, run_vlm_bench, tower_block_flops

    model, proc = tiny_minillava(image_size=56, vision_layers=4)
    cfg = VLMBenchConfig(task="easyvqa", methods=["flowcut", "flowcut+fastv", "dymu", "dymu_vtu"], budgets=[1.0, 0.5],
                         n=4, batch_size=2, timing=False, pictures=0, out=str(tmp_path), calib=4)
    rows = run_vlm_bench(cfg, model=model, processor=proc, log=lambda s: None, progress=False)
    by = {(r["method"], r["budget"]): r for r in rows}
    full, half, whole = by[("full", None)], by[("flowcut", 0.5)], by[("flowcut", 1.0)]
    assert half["visual_kept"] == 8 and half["visual_tokens"] == 16 and whole["visual_kept"] == 16
    assert half["projector_flops"] == pytest.approx(full["projector_flops"] / 2)
    assert whole["tower_flops"] == pytest.approx(full["tower_flops"], rel=1e-3)
    saved_after = 2 * (tower_block_flops(model, 17) - tower_block_flops(model, 9))
    assert half["tower_flops"] <= full["tower_flops"] - saved_after
    assert half["flops_ratio"] < 1 and half["lm_flops"] < full["lm_flops"]
    pipe = by[("flowcut+fastv", 0.5)]
    assert pipe["visual_per_layer"][0] > pipe["visual_per_layer"][-1]
    assert pipe["visual_kept"] == pytest.approx(8, abs=1)  # the tower's count is rounded
    assert pipe["params"].startswith("target_num=10 + k=2")  # round(0.5 / FastV's mean kept x 16), FastV's own k
    dymu, vtu = by[("dymu", 0.5)], by[("dymu_vtu", 0.5)]
    assert dymu["params"].startswith("r_total=8") and "uncalibrated" not in dymu["params"]
    assert by[("dymu", 1.0)]["accuracy"] == full["accuracy"] and by[("dymu", 1.0)]["visual_kept"] == 16
    assert dymu["visual_kept"] < 16 and dymu["kv_bytes_per_sample"] < full["kv_bytes_per_sample"]
    assert vtu["visual_kept"] < 16 and vtu["kv_bytes_per_sample"] == full["kv_bytes_per_sample"]


def test_bench_vlm_saves_calibrations_and_a_resumed_run_reloads_them(tmp_path, monkeypatch):
    """DyMU's thresholds are saved with the run; a resumed run loads them (no calibration runs) and writes the same
    rows; a fresh run calibrates again; resuming a different run is refused before calibrating."""
    from tiny_vlm import tiny_minillava

    from tokenreduce.bench import vlm
    from tokenreduce.bench.checkpoint import CalibrationStore
    from tokenreduce.core.errors import BenchError

    model, proc = tiny_minillava(image_size=56, vision_layers=4)

    def cfg(**kw):
        return vlm.VLMBenchConfig(**{"task": "easyvqa", "methods": ["dymu", "dymu_vtu"], "budgets": [0.5], "n": 2,
                                     "batch_size": 2, "timing": False, "pictures": 0, "out": str(tmp_path), "calib": 2,
                                     **kw})

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("timestamp", "run_s", "loadavg_start", "loadavg_end")}
                for r in rows]

    logs: list[str] = []
    first = vlm.run_vlm_bench(cfg(), model=model, processor=proc, log=logs.append, progress=False)
    assert sum("calibrated" in line for line in logs) == 2
    saved = json.loads((tmp_path / CalibrationStore.FILE).read_text())
    assert len(saved["states"]) == 2 and saved["fingerprint"]["calib"] == 2

    calls = []
    real = tokenreduce.calibrate
    monkeypatch.setattr(tokenreduce, "calibrate", lambda *a, **k: calls.append(a) or real(*a, **k))
    logs.clear()
    resumed = vlm.run_vlm_bench(cfg(resume=True), model=model, processor=proc, log=logs.append, progress=False)
    assert calls == [] and sum("loaded the calibration" in line for line in logs) == 2
    assert strip(resumed) == strip(first)
    vlm.run_vlm_bench(cfg(), model=model, processor=proc, log=lambda s: None, progress=False)
    assert len(calls) == 2  # without --resume nothing saved is reused
    with pytest.raises(BenchError, match="calib: 2 -> 3"):
        vlm.run_vlm_bench(cfg(resume=True, calib=3), model=model, processor=proc, log=lambda s: None, progress=False)
    assert len(calls) == 2


def test_method_params_are_parsed_and_checked_against_the_listed_methods():
    params = parse_method_params(["coarse_to_fine.k=14", "fastv.r=0.25", "flowcut_llm.schedule=[[2, 0.5]]"],
                                 ["coarse_to_fine", "fastv", "flowcut+flowcut_llm"])
    assert params == {"coarse_to_fine": {"k": 14}, "fastv": {"r": 0.25}, "flowcut_llm": {"schedule": [[2, 0.5]]}}
    for item, message in [("fastv=3", "METHOD.NAME=VALUE"), ("fastv.=3", "METHOD.NAME=VALUE"),
                          ("visionzip.dominant=3", "not among the listed methods"),
                          ("fastv.depth=3", "fastv takes no parameter 'depth'"),
                          ("fastv.keep_ratio=0.3", "the budget comes from --budgets")]:
        with pytest.raises(tokenreduce.ParameterError, match=message):
            parse_method_params([item], ["fastv"])


def test_bench_vlm_param_errors_come_before_the_model_loads(capsys, monkeypatch):
    import tokenreduce.assets.minillava as minillava

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the usage error")
    monkeypatch.setattr(minillava, "load_vlm", refuse)
    for argv, message in [(["--methods", "fastv", "--param", "fastv.depth=3"], "takes no parameter"),
                          (["--methods", "fastv", "--param", "fastv"], "METHOD.NAME=VALUE")]:
        with pytest.raises(SystemExit) as e:
            main(["bench", "vlm", *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_bench_vlm_resumes_from_its_saved_results_with_the_rows_of_one_run(tmp_path, monkeypatch):
    """Every (question, cell) result is saved as it finishes; a resumed run with the same arguments runs nothing
    again and writes the rows an unsaved run gives (tile choices and per-layer counts read back from JSON)."""
    from tiny_vlm import tiny_minillava

    from tokenreduce.bench import vlm
    from tokenreduce.bench.checkpoint import FILE
    from tokenreduce.core.errors import BenchError

    model, proc = tiny_minillava(image_size=56, vision_layers=4)

    def cfg(**kw):
        return vlm.VLMBenchConfig(**{"task": "largescene", "methods": ["coarse_to_fine", "visual_random"],
                                     "budgets": [0.5], "n": 3, "batch_size": 2, "timing": False, "pictures": 0,
                                     "out": str(tmp_path), "method_params": {"coarse_to_fine": {"k": 1}}, **kw})

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("timestamp", "run_s", "loadavg_start", "loadavg_end")}
                for r in rows]

    plain = vlm.run_vlm_bench(cfg(out=None), model=model, processor=proc, log=lambda s: None, progress=False)
    vlm.run_vlm_bench(cfg(), model=model, processor=proc, log=lambda s: None, progress=False)
    assert len((tmp_path / FILE).read_text().splitlines()) == 1 + 2 * 5  # 2 batches x (full, blind, focus, 2 cells)

    def no_work(*args):
        raise AssertionError("a saved result ran again")

    monkeypatch.setattr(vlm._VLMTask, "run", no_work)
    resumed = vlm.run_vlm_bench(cfg(resume=True), model=model, processor=proc, log=lambda s: None, progress=False)
    assert strip(resumed) == strip(plain)
    assert any("tile_accuracy" in r for r in resumed) and any("visual_per_layer" in r for r in resumed)
    with pytest.raises(BenchError, match="n: 3 -> 4"):
        vlm.run_vlm_bench(cfg(resume=True, n=4), model=model, processor=proc, log=lambda s: None, progress=False)
