"""`core.schedule.LayerSchedule`: a per-layer visual-token schedule as data (validation, mean kept, JSON round-trip)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.core.method import LayerDropMethod
from tokenreduce.core.schedule import FORMAT, VERSION, LayerSchedule, as_schedule, load, mean_kept


@st.composite
def schedules(draw, max_layers: int = 40):
    """A valid schedule: drop layers ascending in [1, L), fractions in (0, 1] non-increasing; with provenance."""
    num_layers = draw(st.integers(2, max_layers))
    layers = sorted(draw(st.sets(st.integers(1, num_layers - 1), max_size=min(8, num_layers - 1))))
    fracs = sorted((draw(st.floats(1e-6, 1.0, allow_nan=False)) for _ in layers), reverse=True)
    source = draw(st.dictionaries(st.sampled_from(["search", "model", "task", "objective"]),
                                  st.text(max_size=8)))
    source["calibration_n"] = draw(st.integers(1, 500))
    source["params"] = {"tolerance": draw(st.floats(0, 1)), "layers": list(layers)}
    return LayerSchedule(tuple(zip(layers, fracs)), num_layers, draw(st.none() | st.integers(1, 1000)), source)


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_save_then_load_gives_the_same_schedule(tmp_path_factory, s):
    path = tmp_path_factory.mktemp("s") / "schedule.json"
    s.save(path)
    back = load(path)
    assert back == s
    assert back.drops == s.drops and dict(back.source) == dict(s.source)
    assert LayerSchedule.from_json(s.to_json()) == s
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION


@settings(max_examples=200, deadline=None)
@given(schedules())
def test_mean_kept_is_in_0_1_and_is_the_layer_average_of_the_kept_fractions(s):
    m = s.mean_kept()
    assert 0.0 < m <= 1.0
    per_layer, cur, at = [], 1.0, dict(s.drops)
    for layer in range(s.num_layers):
        cur = at.get(layer, cur)
        per_layer.append(cur)
    assert m == pytest.approx(sum(per_layer) / s.num_layers)
    assert LayerDropMethod.mean_kept(s.pairs(), s.num_layers) == m  # one implementation


@settings(max_examples=150, deadline=None)
@given(schedules(), st.data())
def test_invalid_drops_are_refused_with_a_reason(s, data):
    drops = [list(d) for d in s.drops]
    if len(drops) >= 2:
        i = data.draw(st.integers(0, len(drops) - 2))
        swapped = list(drops)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        with pytest.raises(tr.BudgetError, match="ascending|increase"):
            LayerSchedule(tuple(map(tuple, swapped)))
        rising = [list(d) for d in drops]
        rising[-1][1] = min(1.0, rising[-2][1] * 2) if rising[-2][1] < 1.0 else 1.0
        if rising[-1][1] > rising[-2][1]:
            with pytest.raises(tr.BudgetError, match="must not increase"):
                LayerSchedule(tuple(map(tuple, rising)))
    bad = data.draw(st.sampled_from([0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"]))
    with pytest.raises(tr.BudgetError, match=r"\(0, 1\]"):
        LayerSchedule(((1, bad),))
    with pytest.raises(tr.BudgetError, match="beyond this language model"):
        LayerSchedule(((s.num_layers, 0.5),), num_layers=s.num_layers)
    with pytest.raises(tr.BudgetError, match="beyond this language model"):
        LayerSchedule(((s.num_layers + 3, 0.5),)).check(s.num_layers)


def test_drop_layers_are_integers_from_one():
    for layer in (0, -1, 1.0, True, "2"):
        with pytest.raises(tr.BudgetError, match="integer >= 1"):
            LayerSchedule(((layer, 0.5),))
    with pytest.raises(tr.BudgetError, match="pairs"):
        LayerSchedule("2:0.5")
    with pytest.raises(tr.BudgetError, match="pair"):
        LayerSchedule(((2, 0.5, 3),))


def test_loading_says_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(tr.BudgetError, match="not valid JSON"):
        load(bad)
    bad.write_text(json.dumps({"format": "something", "drops": []}))
    with pytest.raises(tr.BudgetError, match="not a tokenreduce schedule"):
        load(bad)
    bad.write_text(json.dumps({"format": FORMAT, "version": VERSION + 1, "drops": []}))
    with pytest.raises(tr.BudgetError, match="version"):
        load(bad)
    bad.write_text(json.dumps({"format": FORMAT, "version": 1, "drops": [[3, 0.5], [2, 0.25]]}))
    with pytest.raises(tr.BudgetError, match="ascending"):
        load(bad)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.json")
    with pytest.raises(tr.BudgetError, match="no schedule file"):
        as_schedule(tmp_path / "missing.json")


def test_kept_counts_and_the_runtime_rounding():
    s = LayerSchedule(((2, 0.5), (4, 1 / 144)), 6, 144)
    assert s.kept_counts(144) == [144, 144, 72, 72, 1, 1]
    assert s.kept_counts(10) == [10, 10, 5, 5, 1, 1]  # at least 1
    assert mean_kept(s.drops, 6) == pytest.approx((1 + 1 + 0.5 + 0.5 + 2 / 144) / 6)
    assert LayerSchedule(()).mean_kept(5) == 1.0
    assert as_schedule([(2, 0.5)]) == LayerSchedule(((2, 0.5),))
