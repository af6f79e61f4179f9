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
