"""DyMU's DToMe: thresholded merging with calibrated per-block thresholds (arXiv 2504.17040).

Plain references (loops, float64) of one thresholded merge step and of the pooled
calibration step are written from the description in the module docstring / the paper's
reference code, not from our vectorised code; the tiny random DINOv2 checks the method end
to end (calibration, variable counts, batched == per-image, exact restore); one slow test
runs the real DINOv2 ViT-S/14.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import Dinov2Config, Dinov2Model

import tokenreduce
from tokenreduce import BudgetError, CalibrationError
from tokenreduce.core.budget import mean_kept
from tokenreduce.methods.dymu import (DToMe, best_edges, dymu_schedule, plan_merge, pooled_merges, solve_r_total,
                                      threshold_merges)
from tokenreduce.methods.tome import bipartite_soft_matching, tome_counts


# ---------------------------------------------------------------- plain references
def ref_threshold_step(metric, x, sizes, n_real, p, thr):
    """One DToMe inference step for ONE image (its first ``n_real`` tokens are real).

    Returns (values [M, D], sizes [M]) in the documented order: protected tokens, unmerged
    A tokens, B tokens, each in token order (the original order when nothing merges).
    """
    toks = list(range(n_real))
    a_set = [i for i in toks if i % 2 == 0 and i >= p]
    b_set = [i for i in toks if i % 2 == 1 and i >= p]
    unit = [metric[i].double() / metric[i].double().norm() for i in range(len(metric))]
    edges = []
    for a in a_set:
        best = None
        for b in b_set:
            s = float(unit[a] @ unit[b])
            if best is None or s > best[0]:
                best = (s, b)
        if best is not None:
            edges.append((best[0], a, best[1]))
    r = min(sum(1 for s, _, _ in edges if s > thr), (n_real - p) // 2)
    chosen = sorted(edges, key=lambda e: -e[0])[:r]
    into = {a: b for _, a, b in chosen}
    if r == 0:
        order = toks
    else:
        order = [i for i in toks if i < p] + [a for a in a_set if a not in into] + b_set
    groups = {i: [i] for i in order}
    for a, b in into.items():
        groups[b].append(a)
    values = [sum(sizes[i] * x[i].double() for i in groups[t]) / sum(sizes[i] for i in groups[t]) for t in order]
    return torch.stack(values), torch.tensor([sum(sizes[i] for i in groups[t]) for t in order], dtype=torch.float64), edges


def ref_pool(node_max, r):
    """Calibration step: the r*B best edges of the whole batch merge; the threshold is the
    score of the best edge NOT merged (index r*B, clamped to the last), clamped at >= 0."""
    flat = [(float(v), k) for k, v in enumerate(node_max.reshape(-1).tolist())]
    ranked = sorted(flat, key=lambda e: -e[0])
    rb = r * node_max.shape[0]
    merged = {k for v, k in ranked[:rb] if v != -math.inf}
    tau = max(ranked[min(rb, len(ranked) - 1)][0], 0.0)
    return merged, tau


# ---------------------------------------------------------------- planning against the references
@st.composite
def batches(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 15))
    p = draw(st.integers(0, 2))
    n_real = [draw(st.integers(max(p, 1), n)) for _ in range(b)]
    thr = draw(st.floats(-0.6, 0.95))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, n, p, n_real, thr, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(batches())
def test_threshold_step_matches_reference(case):
    b, n, p, n_real, thr, seed = case
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, 5, generator=g)
    x = torch.randn(b, n, 3, generator=g)
    sizes = torch.randint(1, 4, (b, n), generator=g).float()  # padded tokens get sizes too: they must not count
    valid = torch.arange(n)[None, :] < torch.tensor(n_real)[:, None]
    refs = [ref_threshold_step(metric[i], x[i], sizes[i].tolist(), n_real[i], p, thr) for i in range(b)]
    assume(all(abs(s - thr) > 1e-5 for r in refs for s, _, _ in r[2]))  # float32 vs float64 at the threshold

    node_max, partner = best_edges(metric, p, None if bool(valid.all()) else valid)
    merged = threshold_merges(node_max, thr, (valid.sum(1) - p) // 2)
    red = plan_merge(merged, partner, sizes, p, None if bool(valid.all()) else valid)
    out, out_sizes, out_valid = red.apply(x), red.sizes(torch.where(valid, sizes, 0.0)), red.valid(valid)

    assert red.num_out == max(len(r[1]) for r in refs)
    for i, (vals, szs, _) in enumerate(refs):
        m = len(szs)
        assert torch.allclose(out[i, :m].double(), vals, atol=1e-6), (i, out[i, :m], vals)
        assert torch.allclose(out_sizes[i, :m].double(), szs)
        assert bool(out_valid[i, :m].all()) and not bool(out_valid[i, m:].any())  # real tokens first, then padding
        assert bool((out[i, m:] == 0).all()) and bool((out_sizes[i, m:] == 0).all())
        if p:
            assert torch.equal(out[i, :p], x[i, :p])  # protected tokens stay in front, untouched


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_pooled_calibration_step_matches_reference(b, na, r, seed):
    g = torch.Generator().manual_seed(seed)
    node_max = torch.rand(b, na, generator=g) * 2 - 0.8  # some negative scores: tau is clamped at 0
    node_max[torch.rand(b, na, generator=g) < 0.2] = -math.inf  # protected / padded rows
    merged, tau = pooled_merges(node_max, r)
    ref_merged, ref_tau = ref_pool(node_max, r)
    assert set(merged.reshape(-1).nonzero().flatten().tolist()) == ref_merged
    assert tau == pytest.approx(ref_tau, abs=1e-7) and tau >= 0.0


@pytest.mark.parametrize("p", [1, 2])
def test_layout_is_tomes_for_a_fixed_r(p):
    """With [CLS] (and more protected tokens), r merges per image land exactly where ToMe puts them."""
    g = torch.Generator().manual_seed(p)
    metric = torch.randn(3, 21, 8, generator=g)
    for r in (1, 4, 9):
        node_max, partner = best_edges(metric, p, None)
        merged = threshold_merges(node_max, -2.0, torch.full((3,), r))
        red = plan_merge(merged, partner, torch.ones(3, 21), p, None)
        dest, num_out = bipartite_soft_matching(metric, r, p)
        assert red.num_out == num_out and torch.equal(red.dest, dest)


def test_no_merge_keeps_order_and_padding_is_dropped():
    """A sample that merges nothing keeps its order; earlier padding never becomes real."""
    metric = torch.randn(2, 9, 4)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    merged = torch.zeros(2, 5, dtype=torch.bool)
    merged[0, 2] = True
    node_max, partner = best_edges(metric, 1, valid)
    assert bool(torch.isinf(node_max[1, 3:]).all())  # padded A rows cannot merge
    red = plan_merge(merged, partner, valid.float(), 1, valid)
    assert red.dest[1].tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1]
    assert red.valid(valid).tolist()[1] == [True] * 6 + [False, False]


# ---------------------------------------------------------------- schedules and budgets
def test_schedules_follow_dymu_configs():
    assert dymu_schedule(27, 537).removed == (20,) * 24 + (19,) * 3  # SigLIP SO400M, 192 out
    assert dymu_schedule(24, 504).removed == (21,) * 24  # CLIP ViT-L/14-336, 72 out
    lin = dymu_schedule(12, 384, "linear").removed
    assert sum(lin) == 384 and list(lin) == sorted(lin, reverse=True) and lin[0] == 64
    assert dymu_schedule(12, 384, "reverse_linear").removed == lin[::-1]
    assert sum(dymu_schedule(12, 10, "linear").removed) == 10  # the reference's loop would not end here


def test_keep_ratio_solves_the_calibration_schedule():
    r_total = solve_r_total(12, 257, 1, 0.5, "constant")
    ratio = lambda rt: mean_kept(tome_counts(257, 1, dymu_schedule(12, rt)), 257)
    assert abs(ratio(r_total) - 0.5) <= min(abs(ratio(r_total - 1) - 0.5), abs(ratio(r_total + 1) - 0.5))
    assert abs(ratio(r_total) - 0.5) < 0.005


def test_budget_errors():
    with pytest.raises(BudgetError):
        DToMe()
    with pytest.raises(BudgetError):
        DToMe(r=4, keep_ratio=0.5)
    with pytest.raises(BudgetError):
        DToMe(r_total=10, r_schedule="cosine")
    m = tokenreduce.get_method("dymu", keep_ratio=0.5)
    assert isinstance(m, DToMe) and m.info().needs_calibration and m.prop_attn


# ---------------------------------------------------------------- tiny random DINOv2
IMG = 112  # 8 x 8 patches of 14 + [CLS] = 65 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       image_size=IMG, patch_size=14)
    return Dinov2Model(cfg).eval()


def images(k: int, seed: int) -> torch.Tensor:
    """Smooth images of varying detail plus varying noise: simple ones merge more."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        side = 2 + (i + seed) % 5
        smooth = torch.nn.functional.interpolate(torch.randn(1, 3, side, side, generator=g), size=IMG, mode="bilinear")[0]
        out.append(smooth + ((i + seed) % 3) * 0.3 * torch.randn(3, IMG, IMG, generator=g))
    return torch.stack(out)


@pytest.fixture(scope="module")
def calibrated(model):
    calib = [images(4, s) for s in range(3)]
    return tokenreduce.calibrate(DToMe(keep_ratio=0.5), model, calib), calib


def test_uncalibrated_use_raises(model):
    with pytest.raises(CalibrationError, match=r"calibrate\(method, model, batches\)"):
        with tokenreduce.apply(model, DToMe(r=4)):
            model(pixel_values=images(1, 0))
    with pytest.raises(CalibrationError):
        DToMe(r=4).state_dict()


def test_calibration_thresholds_and_counts(model, calibrated):
    meth, calib = calibrated
    assert len(meth.thresholds) == 4 and all(0.0 <= t <= 1.0 for t in meth.thresholds)
    sched = meth.calibration["schedule"]
    target = tome_counts(65, 1, dymu_schedule(4, solve_r_total(4, 65, 1, 0.5, "constant")))
    assert sum(sched) > 0
    # calibration merges exactly r*B per block over the batch: on average r per image
    assert meth.calibration["mlp_tokens_per_layer"] == pytest.approx(target)
    # with the thresholds, the same images keep about as many tokens as the schedule
    kept = []
    with torch.no_grad(), tokenreduce.apply(model, meth) as h:
        for x in calib:
            model(pixel_values=x)
            kept.append(h.stats.mlp_tokens_per_layer)
    mean = [sum(c) / len(c) for c in zip(*kept)]
    assert mean_kept(mean, 65) == pytest.approx(mean_kept(target, 65), rel=0.25)
    assert mean[-1] == pytest.approx(target[-1], rel=0.25)


def test_batched_equals_per_image(model, calibrated):
    meth, _ = calibrated
    x = images(6, 100)
    with torch.no_grad():
        with tokenreduce.apply(model, meth, track_source=True) as h:
            out = model(pixel_values=x)
            source = h.source
        alone, counts = [], []
        for i in range(len(x)):
            with tokenreduce.apply(model, meth) as h1:
                alone.append(model(pixel_values=x[i:i + 1]))
            counts.append(h1.stats.mlp_tokens_per_layer[-1])
    assert len(set(counts)) > 1, counts  # the counts really differ: padding is exercised
    for i, o in enumerate(alone):
        m = o.last_hidden_state.shape[1]
        assert m == counts[i]
        assert (out.pooler_output[i] - o.pooler_output[0]).abs().max() <= 1e-4
        assert (out.last_hidden_state[i, :m] - o.last_hidden_state[0]).abs().max() <= 1e-4  # same tokens, same order
    # every input patch is covered by exactly one real output token; padded slots cover nothing
    cover = source.covers()
    assert bool((cover.sum(1) == 1).all())
    assert [int(c.any(-1).sum()) for c in cover] == counts


def test_keep_ratio_one_is_the_full_model(model):
    x = images(2, 7)
    with torch.no_grad():
        full = model(pixel_values=x).last_hidden_state
        meth = DToMe(keep_ratio=1.0)
        with tokenreduce.apply(model, meth) as h:  # no calibration needed: nothing to merge
            out = model(pixel_values=x).last_hidden_state
        assert torch.allclose(out, full, atol=1e-6) and h.stats.flops_ratio == 1.0
        assert tokenreduce.calibrate(meth, model, [x]).thresholds == [1.0] * 4


def test_state_dict_roundtrip_and_restore(model, calibrated):
    meth, _ = calibrated
    x = images(3, 11)
    with torch.no_grad():
        before = model(pixel_values=x).last_hidden_state
        with tokenreduce.apply(model, meth):
            ours = model(pixel_values=x).last_hidden_state
        loaded = DToMe(keep_ratio=0.5).load_state_dict(meth.state_dict())
        assert loaded.thresholds == meth.thresholds
        with tokenreduce.apply(model, loaded):
            again = model(pixel_values=x).last_hidden_state
        after = model(pixel_values=x).last_hidden_state
    assert torch.equal(ours, again)
    assert torch.equal(before, after)
    assert all("forward" not in blk.__dict__ for blk in model.encoder.layer)
    assert model.config._attn_implementation != "tokenreduce"
    with pytest.raises(CalibrationError):
        DToMe(r=1).load_state_dict({"thresholds": []})
    with pytest.raises(CalibrationError, match="4"):
        with tokenreduce.apply(model, DToMe(r=1).load_state_dict({"thresholds": [0.5] * 3})):
            model(pixel_values=x)


# ---------------------------------------------------------------- real DINOv2 ViT-S/14
@pytest.mark.slow
def test_real_dinov2(capsys):
    from tokenreduce.assets import fashion_to_pixels, load_dinov2_small, load_fashion_mnist, natural_photos, preprocess

    model = load_dinov2_small()
    train, _ = load_fashion_mnist("train")
    meth = tokenreduce.calibrate(DToMe(keep_ratio=0.5), model, fashion_to_pixels(train[:16]).split(8))
    test, _ = load_fashion_mnist("test")
    photos = natural_photos()[:2]
    x = torch.cat([fashion_to_pixels(test[:2]), preprocess([p for _, p in photos])])
    with torch.no_grad():
        full = model(pixel_values=x).pooler_output
        with tokenreduce.apply(model, meth) as h:
            out = model(pixel_values=x).pooler_output
        counts, ratios = [], []
        for i in range(len(x)):
            with tokenreduce.apply(model, meth) as h1:
                alone = model(pixel_values=x[i:i + 1]).pooler_output
            assert (alone[0] - out[i]).abs().max() <= 1e-4
            counts.append(int(h1.stats.mlp_tokens_per_layer[-1]))
            ratios.append(h1.stats.flops_ratio)
    cos = torch.nn.functional.cosine_similarity(full, out)
    with capsys.disabled():
        print(f"\n[dymu real dinov2] thresholds {[round(t, 4) for t in meth.thresholds]}\n"
              f"  final tokens per image {counts}, flops_ratio per image {[round(r, 3) for r in ratios]}, "
              f"batched (padded) {h.stats.flops_ratio:.3f}\n  CLS cosine vs full {[round(float(c), 4) for c in cos]}")
    assert len(set(counts)) > 1
    assert float(cos.min()) > 0.9
    assert h.stats.flops_ratio < 0.9 and max(ratios) < 0.9
