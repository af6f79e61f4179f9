"""Tests for the ``tokenreduce`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenreduce.cli import main


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("tokenreduce")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "tokenreduce.cli"]


def test_list_through_the_console_script():
    res = subprocess.run(_script() + ["list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tome" in res.stdout and "2210.09461" in res.stdout and "2202.07800" in res.stdout
    header = res.stdout.splitlines()[0]
    for col in ("name", "stage", "arXiv", "paper", "training-free", "calibration", "native params"):
        assert col in header


def test_list_stage_filter(capsys):
    assert main(["list", "--stage", "kv-cache"]) == 0
    out = capsys.readouterr().out
    assert "tome" not in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "vit", "--methods", "tome,nosuchmethod"], "unknown method 'nosuchmethod'; known encoder methods:"),
    (["bench", "vit", "--budgets", "0.5,1.5"], "(0, 1]"),
    (["bench", "vit", "--budgets", "0"], "(0, 1]"),
    (["bench", "vit", "--budgets", "half"], "comma-separated numbers"),
    (["bench", "vit", "--n-test", "-3"], "positive integer"),
    (["bench", "vit", "--image-size", "100"], "multiple of DINOv2's patch size 14"),
])
def test_bad_arguments_exit_nonzero_with_a_helpful_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown method" in message:
        assert "tome" in err.split("known encoder methods:")[1]


@pytest.mark.parametrize("argv, message", [
    (["bench", "vlm", "--methods", "tome"], "not on visual tokens"),
    (["bench", "vlm", "--methods", "fastvv"], "unknown method 'fastvv'"),
    (["bench", "vlm", "--methods", "full"], "always measured"),
    (["bench", "vlm", "--budgets", "1.5"], "out of range"),
    (["bench", "vlm", "--task", "coco"], "invalid choice"),
])
def test_vlm_bench_usage_errors_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _no_model_load(monkeypatch):
    """Fail the test if the mini-LLaVA starts loading: usage errors come first."""
    import tokenreduce.assets.minillava as minillava

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the usage error")
    monkeypatch.setattr(minillava, "load_vlm", refuse)


@pytest.mark.parametrize("argv, message", [
    (["search-schedule", "--method", "fastervlm"], "works at the connector stage"),
    (["search-schedule", "--method", "tome"], "works at the encoder stage"),
    (["search-schedule", "--method", "nosuch"], "unknown method 'nosuch'"),
    (["search-schedule", "--search", "bayes"], "unknown search 'bayes'"),
    (["search-schedule", "--search", "p-sigmoid"], "needs --budget"),
    (["search-schedule", "--search", "p-sigmoid", "--budget", "1.5"], "out of range"),
    (["search-schedule", "--search", "p-sigmoid", "--budget", "0.25", "--tolerance", "0.1"], "G-Search's"),
    (["search-schedule", "--search", "g", "--budget", "0.25"], "--budget is P-Sigmoid's"),
    (["search-schedule", "--trials", "5"], "--trials is P-Sigmoid's"),
    (["search-schedule", "--tolerance", "-1"], "--tolerance must be >= 0"),
    (["search-schedule", "--layers", "4,2"], "distinct ascending"),
    (["search-schedule", "--layers", "0,2"], "distinct ascending"),
    (["search-schedule", "--task", "coco"], "invalid choice"),
    (["search-schedule", "--n", "0"], "positive integer"),
])
def test_search_schedule_usage_errors_before_the_model_loads(argv, message, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_search_schedule_without_optuna_says_what_to_install_before_the_model_loads(capsys, monkeypatch, no_optuna):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["search-schedule", "--search", "p-sigmoid", "--budget", "0.25"])
    assert e.value.code == 2 and "pip install 'tokenreduce[search]'" in capsys.readouterr().err


def test_bench_vlm_schedule_usage_errors_before_anything_loads(tmp_path, capsys, monkeypatch):
    from tokenreduce.core.schedule import LayerSchedule

    _no_model_load(monkeypatch)
    good = LayerSchedule(((2, 0.5),), 30, 144, {"search": "g-search"}).save(tmp_path / "s.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tokenreduce.schedule", "version": 1, "drops": [[3, 0.5], [2, 0.9]]}')
    for argv, message in [
        (["--schedule", str(good), "--methods", "fastervlm,fastv"], "fastervlm is a connector method"),
        (["--schedule", str(good), "--methods", "visionzip,visual_pool"], "are connector methods"),
        (["--schedule", str(tmp_path / "missing.json")], "no schedule file"),
        (["--schedule", str(bad), "--methods", "fastv"], "strictly ascending"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["bench", "vlm", *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_small_real_run(tmp_path, capsys):
    out = tmp_path / "vit"
    t0 = time.perf_counter()
    rc = main(["bench", "vit", "--methods", "tome", "--budgets", "0.5", "--n-train", "100", "--n-test", "50",
               "--batch-size", "16", "--timing-batches", "1", "--out", str(out), "--no-progress"])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "results.md", "pareto.png"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 1.0), ("tome", 0.5)]
    full, tome = rows
    assert full["fidelity"] == pytest.approx(1.0, abs=1e-6) and full["final_tokens"] == 257
    assert full["probe_acc"] > 0.4 and full["knn_acc"] > 0.3  # 10 classes, 10 train images each: chance is 0.1
    assert 0.45 < tome["flops_ratio"] < 0.6 and 0.8 < tome["fidelity"] < 1.0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| method") and "| tome" in printed
    assert elapsed < 240  # ~60 s on 2 idle cores; generous for a loaded machine


def test_cuda_requested_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["bench", "vit", "--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
