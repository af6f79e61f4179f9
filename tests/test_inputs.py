"""Inputs are checked at `get_method`, before any model work: types, ranges, unknown names and keywords.

The generic cases come from the registry (every registered method, every parameter of its
constructor, its kind read from the annotation), so a method added later is covered too.
"""

from __future__ import annotations

import inspect
import math
import pydoc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.core.budget import check_nonempty
from tokenreduce.core.registry import method_params, registered

CLASSES = registered()
NAMES = sorted(CLASSES)


def kind(cls, param: str) -> str:
    """'bool', 'number', 'str' or 'other', from the constructor's annotation (a string here)."""
    ann = inspect.signature(cls.__init__).parameters[param].annotation
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    if ann == "bool":
        return "bool"
    if "int" in ann or "float" in ann:
        return "number"
    if ann == "str":
        return "str"
    return "other"


PARAMS = [(name, p, kind(CLASSES[name], p)) for name in NAMES for p, _ in method_params(CLASSES[name])]
NUMERIC = [c for c in PARAMS if c[2] == "number"]
BOOLS = [c for c in PARAMS if c[2] == "bool"]
STRS = [c for c in PARAMS if c[2] == "str"]


def build(name: str, param: str, value):
    """``get_method(name, param=value)`` with a valid budget unless ``param`` is the budget itself."""
    base = {} if param == "keep_ratio" else {"keep_ratio": 0.5}
    return tr.get_method(name, **{**base, param: value})


def assert_rejected(name: str, param: str, value):
    with pytest.raises(tr.TokenReduceError) as info:
        build(name, param, value)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, tr.BudgetError), type(err)  # ParameterError is a BudgetError
    msg = str(err)
    assert msg.startswith(f"{name}: {param} must be "), msg  # the method, the parameter, what it accepts
    assert repr(value) in msg, msg  # and what it got


# ---------------------------------------------------------------------------- registry-wide
def test_registry_is_covered():
    assert len(NAMES) >= 17 and {"tome", "snapkv", "gemfilter", "pool", "random"} <= set(NAMES)
    assert all(k != "other" for _, p, k in PARAMS if p in ("keep_ratio", "keep_count", "seed"))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_builds_with_its_defaults(name):
    defaults = {p: d for p, d in method_params(CLASSES[name]) if p != "keep_ratio"}
    m = tr.get_method(name, keep_ratio=0.5, **{p: d for p, d in defaults.items() if d is not None})
    assert m.budget.ratio == 0.5


@pytest.mark.parametrize("name, param", [(n, p) for n, p, _ in PARAMS])
def test_every_parameter_rejects_an_object(name, param):
    assert_rejected(name, param, object())


@pytest.mark.parametrize("name, param", [(n, p) for n, p, _ in NUMERIC])
@pytest.mark.parametrize("value", [True, False, "4", -1, float("nan"), math.inf])
def test_numeric_parameters_reject_bools_strings_negatives(name, param, value):
    assert_rejected(name, param, value)


@pytest.mark.parametrize("name, param", [(n, p) for n, p, _ in BOOLS])
@pytest.mark.parametrize("value", [1, 0, "True", None])
def test_flags_take_only_booleans(name, param, value):
    assert_rejected(name, param, value)


@pytest.mark.parametrize("name, param", [(n, p) for n, p, _ in STRS])
@pytest.mark.parametrize("value", [3, True, "no-such-choice"])
def test_choices_reject_other_values(name, param, value):
    assert_rejected(name, param, value)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(NUMERIC), flag=st.booleans())
def test_no_bool_is_a_number(case, flag):
    assert_rejected(case[0], case[1], flag)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(NUMERIC), value=st.integers(max_value=-1))
def test_no_negative_numeric_parameter(case, value):
    assert_rejected(case[0], case[1], value)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(NUMERIC + BOOLS), value=st.text(max_size=5))
def test_no_string_for_a_number_or_a_flag(case, value):
    assert_rejected(case[0], case[1], value)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), ratio=st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_every_keep_ratio_in_range_is_accepted(name, ratio):
    assert tr.get_method(name, keep_ratio=ratio).budget.ratio == ratio


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), word=st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_unknown_keywords_raise_with_the_parameter_list(name, word):
    accepted = dict(method_params(CLASSES[name]))
    if word in accepted:
        return
    with pytest.raises(tr.UnknownParameterError) as info:
        tr.get_method(name, keep_ratio=0.5, **{word: 1})
    msg = str(info.value)
    assert f"{name} has no parameter {word!r}" in msg
    assert all(f"{p}={d!r}" in msg for p, d in accepted.items())


# ---------------------------------------------------------------------------- 1. the observed defects
def test_pool_kernel_zero_is_rejected_not_taken_as_2():
    with pytest.raises(tr.BudgetError, match=r"pool: kernel must be an integer >= 2 .*; got 0"):
        tr.get_method("pool", kernel=0)
    assert tr.get_method("pool", kernel=3).kernel == 3


def test_tome_negative_r_is_rejected_at_construction():
    with pytest.raises(tr.BudgetError, match=r"tome: r must be an integer >= 0.*; got -3"):
        tr.get_method("tome", r=-3)
    with pytest.raises(tr.BudgetError, match=r"got \[2, -1\]"):
        tr.get_method("tome", r=[2, -1])


def test_tome_string_r_is_rejected_at_construction():
    with pytest.raises(tr.BudgetError, match=r"tome: r must be .*; got '4'"):
        tr.get_method("tome", r="4")
    with pytest.raises(tr.BudgetError, match="inflect in \\[-1, 1\\]"):
        tr.get_method("tome", r=(4, 2.0))
    assert tr.get_method("tome", r=(4, -1)).r == (4, -1.0)


@pytest.mark.parametrize("name", NAMES)
def test_bool_keep_ratio_is_not_one(name):
    with pytest.raises(tr.BudgetError, match=rf"{name}: keep_ratio must be a number in \(0, 1\].*got True \(bool\)"):
        tr.get_method(name, keep_ratio=True)


@pytest.mark.parametrize("name", [n for n, p, _ in PARAMS if p == "keep_count"])
def test_bool_keep_count_is_not_one(name):
    with pytest.raises(tr.BudgetError, match=rf"{name}: keep_count must be an integer >= 1"):
        tr.get_method(name, keep_count=True)


def test_random_string_seed_fails_in_get_method_not_in_torch():
    with pytest.raises(tr.ParameterError, match=r"random: seed must be an integer in \[0, 4294967295\]; got 'x'"):
        tr.get_method("random", keep_ratio=0.5, seed="x")


def test_parameter_errors_still_caught_as_before():
    # these raised BudgetError or StageError before ParameterError existed
    with pytest.raises(tr.BudgetError, match="odd"):
        tr.get_method("snapkv", keep_ratio=0.5, kernel_size=4)
    with pytest.raises(tr.StageError, match="gemfilter: layer"):
        tr.get_method("gemfilter", keep_count=4, layer=True)


def test_values_are_normalised():
    m = tr.get_method("knorm", keep_ratio=1, skip_layers=range(2))
    assert m.budget.ratio == 1.0 and isinstance(m.budget.ratio, float) and m.skip_layers == (0, 1)
    assert tr.get_method("mctf", r=0.25).r == 0.25 and tr.get_method("h2o", keep_ratio=0.5, recent_fraction=1).recent_fraction == 1.0


# ---------------------------------------------------------------------------- 2. unknown keywords
def test_unknown_keyword_suggests_the_closest_parameter():
    with pytest.raises(tr.UnknownParameterError) as info:
        tr.get_method("snapkv", window=8)
    msg = str(info.value)
    assert "snapkv has no parameter 'window'; did you mean 'window_size'?" in msg
    assert "keep_ratio=None, keep_count=None, window_size=32, kernel_size=5, pooling='avgpool'" in msg
    assert isinstance(info.value, TypeError)  # as Python's own unexpected-keyword error
    with pytest.raises(tr.UnknownParameterError, match="tome has no parameter 'keep_ration'; did you mean 'keep_ratio'"):
        tr.get_method("tome", keep_ration=0.5)


def test_unknown_keyword_without_a_close_one():
    with pytest.raises(tr.UnknownParameterError) as info:
        tr.get_method("tova", zzzz=1)
    assert "did you mean" not in str(info.value) and "keep_count=None" in str(info.value)


def test_kvcrush_base_params_are_checked_by_the_base():
    with pytest.raises(tr.UnknownParameterError, match="kvcrush: base_params: snapkv has no parameter 'window'"):
        tr.get_method("kvcrush", keep_ratio=0.5, base_params={"window": 8})
    with pytest.raises(tr.ParameterError, match="kvcrush: base_params must be a dict of keyword arguments without"):
        tr.get_method("kvcrush", keep_ratio=0.5, base_params={"keep_ratio": 0.3})
    with pytest.raises(tr.ParameterError, match="kvcrush: base must be a prefill-time kv-cache method: .*'snapkv'.*"
                                                "got 'snap'"):
        tr.get_method("kvcrush", keep_ratio=0.5, base="snap")
    with pytest.raises(tr.StageError, match="evicts again while decoding"):  # a known method of the wrong kind
        tr.get_method("kvcrush", keep_ratio=0.5, base="h2o")


# ---------------------------------------------------------------------------- 3. unknown method names
@pytest.mark.parametrize("typo, meant", [("snapvk", "snapkv"), ("tomee", "tome"), ("stremaing_llm", "streaming_llm")])
def test_unknown_method_suggests_the_closest_names(typo, meant):
    with pytest.raises(tr.StageError) as info:
        tr.get_method(typo)
    msg = str(info.value)
    assert f"unknown method {typo!r}; did you mean {meant!r}" in msg
    assert msg.split("known methods: ")[1].split(", ") == NAMES


def test_unknown_method_that_is_not_a_string():
    with pytest.raises(tr.StageError, match="unknown method 3; known methods: a2ats"):
        tr.get_method(3)


# ---------------------------------------------------------------------------- 4. stages
def test_list_methods_unknown_stage_suggests_kv_cache():
    with pytest.raises(tr.StageError, match="unknown stage 'kv'; did you mean 'kv-cache'\\? stages: encoder, connector, "
                                            "decoder, kv-cache, text"):
        tr.list_methods("kv")
    with pytest.raises(tr.StageError, match="did you mean 'encoder'"):
        tr.list_methods("encoders")


def test_the_planned_text_stage_lists_nothing_yet():
    assert tr.list_methods("text") == []
    assert {i.name for i in tr.list_methods("connector")} == {"fastervlm", "visionzip", "vflowopt", "visual_random",
                                                                  "visual_pool"}
    assert {i.stage for i in tr.list_methods()} <= {"encoder", "connector", "decoder", "kv-cache", "text"}


def test_cli_list_unknown_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "--stage", "kv"])
    assert e.value.code == 2 and "did you mean 'kv-cache'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 5. defaults in MethodInfo and the CLI
def test_method_info_has_defaults():
    info = {i.name: i for i in tr.list_methods()}
    assert info["tome"].native_params == ("r", "prop_attn")
    assert info["tome"].defaults == (("r", None), ("prop_attn", True))
    assert info["tome"].params == {"r": None, "prop_attn": True}
    assert info["snapkv"].params_text() == "keep_count=None, window_size=32, kernel_size=5, pooling='avgpool'"
    for i in info.values():
        assert tuple(n for n, _ in i.defaults) == i.native_params
    hash(info["tome"])  # still a frozen, hashable record


def test_cli_list_shows_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "r=None, prop_attn=True" in out and "window_size=32, kernel_size=5" in out


# ---------------------------------------------------------------------------- 6. docstrings
def test_help_shows_the_paper_docstring():
    m = tr.get_method("tome", r=4)
    assert "Token Merging: Your ViT But Faster (Bolya et al." in inspect.getdoc(m)
    assert "Differences:" in pydoc.render_doc(m, renderer=pydoc.plaintext)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_class_carries_its_module_docstring(name):
    import sys

    cls = CLASSES[name]
    module_doc = sys.modules[cls.__module__].__doc__
    assert module_doc and module_doc.strip()[:40] in inspect.getdoc(cls)


# ---------------------------------------------------------------------------- 7. empty samples
def test_check_nonempty_names_the_sample():
    check_nonempty(torch.tensor([3, 1]), "x")
    with pytest.raises(tr.BudgetError, match=r"^x: sample 1 has no real tokens \(its attention_mask row is all zeros\); "
                                             r"remove it from the batch$"):
        check_nonempty(torch.tensor([3, 0]), "x")
    with pytest.raises(tr.BudgetError, match=r"samples 0, 2 have no real tokens \(their attention_mask rows"):
        check_nonempty([0, 4, 0], "x")


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"keep_count": 1}])
def test_kv_budget_with_an_empty_sample_says_remove_it(budget):
    m = tr.get_method("snapkv", **budget)
    with pytest.raises(tr.BudgetError, match="snapkv: sample 1 has no real tokens") as info:
        m.budgets(torch.tensor([12, 0]))
    assert "keep_count=1" not in str(info.value)  # the old advice, which failed again


def test_left_padded_batch_with_an_all_zero_mask_row():
    from tiny_lm import left_pad, prompt, tiny_lm
    from transformers import DynamicCache

    model = tiny_lm("llama")
    ids, mask = left_pad([prompt(12)[0], prompt(8, seed=1)[0]])
    mask[1] = 0
    with pytest.raises(tr.BudgetError, match=r"h2o: sample 1 has no real tokens .*remove it from the batch"):
        with torch.no_grad(), tr.apply(model, tr.get_method("h2o", keep_ratio=0.5)):
            model(ids, attention_mask=mask, past_key_values=DynamicCache())


def test_prefill_filter_budget_with_an_empty_sample_says_remove_it():
    with pytest.raises(tr.BudgetError, match="gemfilter: sample 1 has no real tokens"):
        tr.get_method("gemfilter", keep_count=2).budgets(torch.tensor([12, 0]))


# ---------------------------------------------------------------------------- 8. DyMU's documented difference
def test_dymu_docstring_states_the_sort_difference():
    doc = " ".join(inspect.getdoc(tr.get_method("dymu", r_total=4)).split())
    assert "stable sort" in doc and "non-stable ``argsort``" in doc and "1e-2" in doc and "2e-7" in doc
