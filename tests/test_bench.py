"""Tests for tokenreduce.bench: classifiers, reports, plots, timing, and the ViT runner on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce
from tokenreduce.bench.plot import Panel, pareto_plot
from tokenreduce.bench.report import Column, markdown_table, read_jsonl, sort_rows, write_jsonl, write_markdown
from tokenreduce.bench.tasks_vit import (KNNClassifier, LazyPixels, LinearProbe, balanced_subset, extract_features,
                                         fidelity)
from tokenreduce.bench.timing import RSSSampler, measure_paired, measure_throughput
from tokenreduce.bench.vit import FULL, ViTBenchConfig, ViTData, check_budgets, check_methods, run_vit_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- classifiers
def _clusters(n, classes=10, dim=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.arange(n) % classes
    return centers[labels] + noise * torch.randn(n, dim, generator=g), labels


def _random(n, classes=10, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("make", [lambda: KNNClassifier(k=20), lambda: LinearProbe()])
def test_classifiers_separable_features(make):
    xtr, ytr = _clusters(300, seed=0)
    g = torch.Generator().manual_seed(1)
    xte = xtr[:200] + 0.05 * torch.randn(200, xtr.shape[1], generator=g)
    clf = make().fit(xtr, ytr)
    assert clf.score(xte, ytr[:200]) >= 0.99


@pytest.mark.parametrize("make", [lambda: KNNClassifier(k=20), lambda: LinearProbe()])
def test_classifiers_random_labels_are_at_chance(make):
    xtr, ytr = _random(500, seed=0)
    xte, yte = _random(1000, seed=1)
    acc = make().fit(xtr, ytr).score(xte, yte)
    assert 0.03 < acc < 0.2  # chance is 0.1; 1000 test samples => std ~0.01


def test_knn_matches_plain_reference():
    """DINO-style weighted kNN written out sample by sample."""
    xtr, ytr = _random(120, classes=4, dim=8, seed=2)
    xte, _ = _random(30, classes=4, dim=8, seed=3)
    k, t = 7, 0.07
    expected = []
    for q in xte:
        sims = [float(torch.dot(q, x) / (q.norm() * x.norm())) for x in xtr]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * 4
        for i in order:
            votes[int(ytr[i])] += math.exp(sims[i] / t)
        expected.append(max(range(4), key=lambda c: votes[c]))
    got = KNNClassifier(k=k, temperature=t).fit(xtr, ytr).predict(xte)
    assert got.tolist() == expected


def test_linear_probe_is_deterministic_and_scale_invariant():
    xtr, ytr = _clusters(200, noise=0.5, seed=4)
    a = LinearProbe().fit(xtr, ytr)
    b = LinearProbe().fit(3.0 * xtr, ytr)  # L2 normalisation: feature scale must not matter
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    assert torch.equal(a.predict(xtr), b.predict(5.0 * xtr))


def test_fidelity():
    x = torch.randn(5, 16)
    assert fidelity(x, x) == pytest.approx(1.0)
    assert fidelity(-x, x) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        fidelity(x, x[:3])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=5, max_size=80), st.integers(1, 80), st.integers(0, 5))
def test_balanced_subset_properties(labels, n, seed):
    labels = torch.tensor(labels)
    n = min(n, labels.numel())
    idx = balanced_subset(labels, n, seed)
    assert idx.numel() == n and idx.unique().numel() == n
    assert torch.equal(idx, balanced_subset(labels, n, seed))  # seeded
    counts = torch.bincount(labels[idx], minlength=5)
    avail = torch.bincount(labels, minlength=5)
    # a class gets fewer than the largest share only when it ran out of samples
    for c in range(5):
        if counts[c] < counts.max() - 1:
            assert counts[c] == avail[c]


def test_balanced_subset_is_balanced():
    labels = torch.arange(1000) % 10
    idx = balanced_subset(labels, 100, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10] * 10
    assert not torch.equal(idx, balanced_subset(labels, 100, seed=1))


# ---------------------------------------------------------------- reports and plots
ROWS = [
    {"method": "tome", "budget": 0.5, "acc": 0.8, "gflops": 2.0, "ms": 5.0, "extra": [1, 2]},
    {"method": "none", "budget": 1.0, "acc": 0.9, "gflops": 4.0, "ms": 10.0, "extra": None},
    {"method": "evit", "budget": 0.75, "acc": 0.85, "gflops": 3.0, "ms": None},
    {"method": "tome", "budget": 0.75, "acc": 0.87, "gflops": 3.0, "ms": 7.0, "t": torch.tensor([1.5])},
]


def test_report_jsonl_and_markdown(tmp_path):
    path = write_jsonl(ROWS, tmp_path / "r.jsonl")
    back = read_jsonl(path)
    assert [r["method"] for r in back] == ["tome", "none", "evit", "tome"]
    assert back[3]["t"] == [1.5]  # tensors become JSON lists
    write_jsonl(ROWS[:1], path, append=True)
    assert len(read_jsonl(path)) == 5

    rows = sort_rows(ROWS, first=lambda r: r["method"] == "none", keys=("method", "-budget"))
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 1.0), ("evit", 0.75), ("tome", 0.75), ("tome", 0.5)]
    cols = [Column("method"), Column("budget", fmt=".2f"), Column("acc", "accuracy", ".3f"),
            Column("ms", "ms/img", ".1f")]
    table = markdown_table(rows, cols)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["method", "budget", "accuracy", "ms/img"]
    assert lines[1].startswith("|:") and lines[1].endswith(":|")  # text left, numbers right
    assert "0.850" in lines[3] and "—" in lines[3]  # evit: missing ms
    assert len(lines) == 2 + len(rows)
    md = write_markdown(rows, cols, tmp_path / "r.md", title="T", notes=["a note"])
    text = md.read_text()
    assert text.startswith("# T") and "| accuracy |" in text.replace("  ", " ") and "- a note" in text


def test_pareto_plot_writes_png(tmp_path):
    path = pareto_plot(ROWS, tmp_path / "p.png", y="acc", panels=[Panel("gflops"), Panel("ms"), Panel("missing")],
                       is_reference=lambda r: r["method"] == "none", annotate="budget")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


# ---------------------------------------------------------------- timing
def test_measure_throughput_counts_calls_and_is_positive():
    calls = []
    t = measure_throughput(lambda: calls.append(sum(range(20000))), items=8, repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3
    assert t.items_per_s > 0 and t.ms_per_item > 0 and t.peak_mem_mb >= 0
    assert t.ms_per_item == pytest.approx(1000 * t.median_s / 8)
    assert "RSS" in t.mem_kind
    with pytest.raises(ValueError):
        measure_throughput(lambda: None, items=1, repeats=0)


def test_measure_paired_alternates_and_compares_under_the_same_load():
    import time

    order = []

    def ref():
        order.append("r")
        time.sleep(0.01)

    def cand():
        order.append("c")
        time.sleep(0.03)

    r, c = measure_paired(ref, cand, items=4, repeats=3, warmup=1)
    assert "".join(order) == "c" + "rc" * 3  # candidate warm-up, then strictly alternating
    assert len(r.times) == len(c.times) == 3
    assert 0.15 < c.items_per_s / r.items_per_s < 0.6  # ~1/3
    assert r.peak_mem_mb is not None and c.peak_mem_mb is not None


def test_rss_sampler_sees_an_allocation():
    with RSSSampler(interval=0.001) as s:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB, touched
        x += 1
        import time

        time.sleep(0.02)
        del x
    assert s.peak_delta > 150 * 2**20


# ---------------------------------------------------------------- the ViT runner on a tiny model
def _tiny_model():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=56,
                       patch_size=14, attn_implementation="sdpa")
    return Dinov2Model(cfg).eval()


def _tiny_data(n_train=40, n_test=24, cache_key=None):
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 3, 56, 56, generator=g)  # 4 classes, each a noisy prototype image

    def make(n):
        y = torch.arange(n) % 4
        return protos[y] + 0.3 * torch.randn(n, 3, 56, 56, generator=g), y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return ViTData(xtr, ytr, xte, yte, torch.randn(3, 3, 56, 56, generator=g), name="tiny", cache_key=cache_key)


def test_vit_runner_end_to_end(tmp_path):
    cfg = ViTBenchConfig(methods=["tome", "random"], budgets=[0.5], batch_size=8, image_size=56, timing_batches=1,
                         out=tmp_path, model_id="tiny")
    model, data = _tiny_model(), _tiny_data()
    before = extract_features(model, data.photo_pixels)
    rows = run_vit_bench(cfg, model=model, data=data, progress=False, log=lambda m: None)
    assert [(r["method"], r["budget"]) for r in rows] == [(FULL, 1.0), ("tome", 0.5), ("random", 0.5)]
    full, tome = rows[0], rows[1]
    assert full["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert full["flops_ratio"] == pytest.approx(1.0) and full["final_tokens"] == 17
    assert full["speedup"] == pytest.approx(1.0) and full["full_img_per_s_min"] <= full["full_img_per_s_max"]
    assert tome["speedup"] == pytest.approx(tome["img_per_s"] / tome["full_img_per_s_paired"])
    # one timed pair: its speedup is the row's, and one pair has no spread to flag
    assert tome["speedup_pairs"] == [pytest.approx(tome["speedup"])] and tome["speedup_spread"] is None
    assert tome["speedup_noisy"] is False and "speedup_pairs" not in full
    assert tome["flops_ratio"] < 0.8 and tome["final_tokens"] < 17
    assert tome["gflops_full"] == pytest.approx(full["gflops"])
    assert tome["fidelity"] < 1.0
    for r in rows:
        assert 0.0 <= r["knn_acc"] <= 1.0 and 0.0 <= r["probe_acc"] <= 1.0
        assert r["img_per_s"] > 0 and r["batch_size"] == 8 and r["device"] == "cpu" and r["torch"] == torch.__version__
        assert r["timestamp"] and "params" in r and r["bench"] == "vit" and "loadavg_end" in r
    assert full["probe_acc"] > 0.9  # prototypes are separable even through a random network
    back = read_jsonl(tmp_path / "results.jsonl")
    assert [r["method"] for r in back] == [FULL, "tome", "random"]
    assert back[1]["params"]["prop_attn"] is True
    md = (tmp_path / "results.md").read_text()
    assert "probe acc" in md and "peak RSS delta, sampled (MB)" in md and "| tome" in md
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    # the model is restored exactly after all methods ran
    assert torch.equal(extract_features(model, data.photo_pixels), before)


def test_vit_runner_caches_train_features_and_calibrates(tmp_path, monkeypatch):
    from tokenreduce.methods.tome import ToMe

    calls = []

    class CalibratedToMe(ToMe):  # not registered: the registry stays as it is
        needs_calibration = True

    real = tokenreduce.get_method
    def get_method(name, **kw):
        return CalibratedToMe(**kw) if name == "tome" and kw["keep_ratio"] < 1 else real(name, **kw)

    def calibrate(method, model, batches):
        assert isinstance(method, CalibratedToMe)
        calls.append([b.shape[0] for b in batches])
        return method

    monkeypatch.setattr(tokenreduce, "get_method", get_method)
    monkeypatch.setattr(tokenreduce, "calibrate", calibrate)
    cfg = ViTBenchConfig(methods=["tome"], budgets=[0.75], batch_size=16, image_size=56, timing=False, out=None,
                         cache_dir=tmp_path, model_id="tiny", calib_images=36)
    model, data = _tiny_model(), _tiny_data(cache_key="tiny-data")
    first = run_vit_bench(cfg, model=model, data=data, progress=False, log=lambda m: None)
    assert calls == [[32, 4]] and first[1]["calib_s"] >= 0 and first[0]["calib_s"] is None
    assert list((tmp_path / "bench-features").glob("tiny-*-tiny-data-v1.pt"))
    second = run_vit_bench(cfg, model=model, data=data, progress=False, log=lambda m: None)
    assert not first[0]["train_features_cached"] and second[0]["train_features_cached"]
    assert second[0]["probe_acc"] == first[0]["probe_acc"] and "img_per_s" not in second[0]


def test_checks_say_what_is_known():
    with pytest.raises(tokenreduce.StageError, match="known encoder methods: .*tome"):
        check_methods(["tome", "nope"])
    with pytest.raises(tokenreduce.BudgetError, match=r"\(0, 1\]"):
        check_budgets([0.5, 1.5])
    assert check_budgets([1, 0.25]) == [1.0, 0.25]


def test_lazy_pixels_slices():
    imgs = torch.arange(10)
    lp = LazyPixels(imgs, lambda x: x.float()[:, None] * 2)
    assert len(lp) == 10 and lp[2:5].squeeze(1).tolist() == [4.0, 6.0, 8.0]


def test_vlm_accuracy_by_question_kind_is_reported(tmp_path):
    from tokenreduce.bench.vlm import accuracy_by_kind, write_vlm_report

    runs = [{"kinds": ["color", "shape", "color"], "correct": [True, False, False]},
            {"kinds": ["side"], "correct": [True]}]
    by_kind = accuracy_by_kind(runs)
    assert by_kind == {"color": 0.5, "shape": 0.0, "side": 1.0}
    row = {"task": "scenes", "method": "full", "budget": None, "accuracy": 0.5, "n": 4, "accuracy_by_kind": by_kind,
           "flops_ratio": 1.0, "visual_kept_ratio": 1.0}
    reduced = {**row, "method": "fastv", "budget": 0.25, "flops_ratio": 0.4, "scoring_share": 0.0123}
    md = write_vlm_report([row, reduced], tmp_path)["markdown"].read_text()
    assert "color 0.50 · shape 0.00 · side 1.00" in md
    assert "scoring share of FLOPs" in md and "0.012 |" in md
