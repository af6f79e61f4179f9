"""G-Search and P-Sigmoid (`tokenreduce.search`, arXiv 2412.00556) on synthetic calibration scores whose right
answer is known."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.core.schedule import LayerSchedule, mean_kept
from tokenreduce.search import g_search, p_sigmoid_keep, p_sigmoid_schedule, p_sigmoid_search


def need_accuracy(need: list[int], visual: int, per_token: float = 0.01):
    """Accuracy 1.0 while every layer keeps at least ``need[layer]`` tokens, losing ``per_token`` per token short."""
    def evaluate(schedule: LayerSchedule) -> float:
        counts = schedule.kept_counts(visual, len(need))
        return 1.0 - per_token * sum(max(0, n - k) for n, k in zip(need, counts))
    return evaluate


@st.composite
def needs(draw):
    """A non-increasing token need per layer (layer 0 needs everything: it cannot drop)."""
    layers, visual = draw(st.integers(2, 16)), draw(st.integers(1, 200))
    rest = sorted((draw(st.integers(1, visual)) for _ in range(layers - 1)), reverse=True)
    return [visual] + rest, visual


@settings(max_examples=80, deadline=None)
@given(needs())
def test_g_search_finds_the_known_minimal_schedule(case):
    need, visual = case
    schedule, log = g_search(need_accuracy(need, visual), len(need), visual)
    assert schedule.kept_counts(visual) == need  # the fewest tokens at every layer with the accuracy held
    assert schedule.source["search"] == "g-search" and schedule.source["score"] == 1.0
    assert len(log) == len({tuple(map(tuple, e["drops"])) for e in log})  # memoised: each schedule once
    per_layer = math.ceil(math.log2(visual)) + 1 if visual > 1 else 1
    assert len(log) <= 2 + (len(need) - 1) * per_layer  # bisection, not a scan


def test_g_search_with_a_tolerance_and_candidate_layers():
    need, visual = [64, 64, 40, 40, 30, 20, 20, 10, 10, 5, 5, 5], 64
    evaluate = need_accuracy(need, visual)
    loose, _ = g_search(evaluate, len(need), visual, tolerance=0.05)
    counts = loose.kept_counts(visual)
    assert evaluate(loose) >= 0.95 and sum(counts) < sum(need)
    coarse, _ = g_search(evaluate, len(need), visual, layers=[4, 8])
    assert coarse.layers == (4, 8) and coarse.kept_counts(visual) == [64] * 4 + [30] * 4 + [10] * 4
    assert coarse.source["params"]["layers"] == [4, 8]
    with pytest.raises(tr.BudgetError, match="ascending"):
        g_search(evaluate, len(need), visual, layers=[8, 4])
    with pytest.raises(tr.BudgetError, match="tolerance"):
        g_search(evaluate, len(need), visual, tolerance=-0.1)


def test_g_search_stops_when_one_token_is_left_and_keeps_all_when_nothing_can_go():
    calls = []

    def anything_goes(s):
        calls.append(s)
        return 1.0

    schedule, log = g_search(anything_goes, 30, 8)
    assert schedule.drops == ((1, 1 / 8),) and len(log) <= 6  # one token from layer 1 on; no other layer visited
    strict, _ = g_search(lambda s: 1.0 if not s.drops else 0.0, 6, 8)
    assert strict.drops == ()


def toy_flops(num_layers: int):
    return lambda s: mean_kept(s.drops, num_layers)  # cost proportional to the visual tokens kept


def early_tokens_matter(num_layers: int, visual: int):
    """A score that values tokens in shallow layers more than deep ones (what G-Search's curves suggest)."""
    weight = [1.0 / (1 + layer) for layer in range(num_layers)]

    def evaluate(s: LayerSchedule) -> float:
        counts = s.kept_counts(visual, num_layers)
        return sum(w * c for w, c in zip(weight, counts)) / (visual * sum(weight))
    return evaluate


def test_p_sigmoid_respects_the_budget_spends_it_and_is_seeded_deterministic():
    pytest.importorskip("optuna")
    layers, visual, budget = 16, 64, 0.4
    evaluate, flops = early_tokens_matter(layers, visual), toy_flops(layers)
    a, log_a = p_sigmoid_search(evaluate, layers, flops, budget, trials=12, seed=3, visual_tokens=visual)
    b, log_b = p_sigmoid_search(evaluate, layers, flops, budget, trials=12, seed=3, visual_tokens=visual)
    assert a == b and [e["score"] for e in log_a] == [e["score"] for e in log_b]
    for entry in log_a:  # every trial within the budget, and none leaves more than a token-layer of it unspent
        assert entry["flops"] <= budget + 1e-12
        assert entry["flops"] >= budget - 2 / (visual * layers) - 1e-9
    assert flops(a) <= budget and a.source["flops"] == flops(a) and a.source["search"] == "p-sigmoid"
    assert a.source["score"] == max(e["score"] for e in log_a) and a.source["seed"] == 3
    uniform = LayerSchedule(((1, round((budget * layers - 1) / (layers - 1) * visual) / visual),), layers, visual)
    assert flops(uniform) <= budget + 1e-9 and evaluate(a) > evaluate(uniform)  # beats keeping the same from layer 1
    c, _ = p_sigmoid_search(evaluate, layers, flops, budget, trials=12, seed=4, visual_tokens=visual, sampler="tpe")
    assert flops(c) <= budget


def test_p_sigmoid_refuses_budgets_it_cannot_meet_or_need_not():
    pytest.importorskip("optuna")
    flops = toy_flops(8)
    with pytest.raises(tr.BudgetError, match="below the cheapest"):
        p_sigmoid_search(lambda s: 0.0, 8, flops, 0.05, trials=2, visual_tokens=16)
    with pytest.raises(tr.BudgetError, match="nothing needs dropping"):
        p_sigmoid_search(lambda s: 0.0, 8, flops, 1.0, trials=2, visual_tokens=16)


def test_p_sigmoid_without_optuna_says_what_to_install_before_any_work(no_optuna):
    calls = []
    with pytest.raises(ImportError, match=r"pip install 'tokenreduce\[search\]'"):
        p_sigmoid_search(lambda s: calls.append(s) or 0.0, 8, lambda s: calls.append(s) or 0.0, 0.5, trials=2)
    assert not calls


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.floats(0.01, 20), st.floats(-10, 50), st.floats(0, 0.99), st.integers(1, 300))
def test_the_p_sigmoid_curve_falls_with_depth_and_makes_a_valid_schedule(layers, k, centre, floor, visual):
    keep = p_sigmoid_keep(layers, k, centre, floor)
    assert keep[0] == 1.0 and all(a >= b for a, b in zip(keep, keep[1:]))
    assert all(floor - 1e-12 <= v <= 1.0 for v in keep)
    s = p_sigmoid_schedule(layers, k, centre, floor, visual)
    counts = s.kept_counts(visual)
    assert counts[0] == visual and all(a >= b for a, b in zip(counts, counts[1:]))
    assert all(abs(c - max(1, keep[i] * visual)) <= 1 for i, c in enumerate(counts))
