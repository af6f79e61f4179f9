"""apply/patch on every supported encoder family: equivalence, exact restore, stats, errors."""

import pytest
import torch
from conftest import FAMILIES, main_output, pixels, tiny

import tokenreduce as tr

CLS_METHODS = ["tome", "evit", "random", "pool"]


def methods_for(family):
    return [m for m in CLS_METHODS if not (family == "siglip" and m == "evit")]


def snapshot(model):
    """Everything apply() may touch: instance dicts of every module, configs, parameters."""
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    configs = {name: (m.config._attn_implementation_internal if hasattr(m, "config") else None) for name, m in model.named_modules()}
    return dicts, configs, {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model, snap):
    dicts, configs, state = snap
    now_dicts, now_configs, now_state = snapshot(model)
    assert configs == now_configs
    for name, d in dicts.items():
        assert set(d) == set(now_dicts[name]), name
        assert d.get("forward") is now_dicts[name].get("forward")
    assert all(torch.equal(state[k], now_state[k]) for k in state)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_is_bit_identical_and_restored(family):
    model, x = tiny(family), pixels(2)
    snap = snapshot(model)
    with torch.no_grad():
        ref = main_output(model(x))
        for name in methods_for(family):
            with tr.apply(model, tr.get_method(name, keep_ratio=1.0)) as h:
                out = main_output(model(x))
            assert torch.equal(out, ref), name
            assert h.stats.flops_ratio == 1.0
        assert torch.equal(main_output(model(x)), ref)
    assert_restored(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_cuts_tokens_and_flops(family):
    model, x = tiny(family), pixels(2)
    with torch.no_grad():
        for name in methods_for(family):
            with tr.apply(model, tr.get_method(name, keep_ratio=0.5)) as h:
                out = main_output(model(x))
            assert torch.isfinite(out).all()
            s = h.stats
            assert s.mlp_tokens_per_layer[-1] < s.tokens_per_layer[0], name
            kept = sum(s.mlp_tokens_per_layer) / (len(s.mlp_tokens_per_layer) * s.tokens_per_layer[0])
            assert abs(kept - 0.5) < 0.1, (name, kept)  # the documented meaning of keep_ratio
            assert s.flops_ratio < 0.85, (name, s.flops_ratio)


def test_restore_after_exception():
    model, x = tiny("dinov2"), pixels(2)
    snap = snapshot(model)
    ref = model(x).last_hidden_state
    with pytest.raises(RuntimeError, match="boom"):
        with tr.apply(model, tr.get_method("tome", r=4)):
            model(x)
            raise RuntimeError("boom")
    assert_restored(model, snap)
    assert torch.equal(model(x).last_hidden_state, ref)


def test_patch_handle_remove():
    model, x = tiny("vit"), pixels(1)
    ref = model(x).last_hidden_state
    h = tr.patch(model, tr.get_method("tome", r=6))
    assert model(x).last_hidden_state.shape[1] < ref.shape[1]
    h.remove()
    h.remove()  # idempotent
    assert torch.equal(model(x).last_hidden_state, ref)


@pytest.mark.parametrize("name", ["tome", "evit", "pool"])
def test_batch_equals_one_at_a_time(name):
    model, x = tiny("dinov2"), pixels(3)
    with torch.no_grad(), tr.apply(model, tr.get_method(name, keep_ratio=0.6)):
        batched = model(x).last_hidden_state
        single = torch.cat([model(x[i : i + 1]).last_hidden_state for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_eager_and_sdpa_agree_under_reduction():
    x = pixels(2)
    outs = {}
    for attn in ("eager", "sdpa"):
        model = tiny("dinov2", attn)
        with torch.no_grad():
            ref = model(x).last_hidden_state
            with tr.apply(model, tr.get_method("tome", r=8)):
                outs[attn] = model(x).last_hidden_state
            assert torch.equal(model(x).last_hidden_state, ref)
            assert model.config._attn_implementation == attn
    assert torch.allclose(outs["eager"], outs["sdpa"], atol=1e-5)


def test_source_map_covers_every_patch_once():
    model, x = tiny("vit"), pixels(2)
    with torch.no_grad(), tr.apply(model, tr.get_method("tome", r=8), track_source=True) as h:
        out = model(x).last_hidden_state
    covers = h.source.covers()  # [B, M, N0]
    assert covers.shape == (2, out.shape[1], 65)
    assert torch.equal(covers.sum(1), torch.ones(2, 65, dtype=torch.long))  # merging drops nothing
    assert covers[:, 0, 0].all()  # [CLS] stays first and alone
    assert covers[:, 0].sum(-1).eq(1).all()


def test_unsupported_model_names_the_supported_families():
    with pytest.raises(tr.UnsupportedModelError, match="Dinov2Model"):
        tr.apply(torch.nn.Linear(3, 3), tr.get_method("tome", r=2)).__enter__()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_budget_says_the_range(bad):
    with pytest.raises(tr.BudgetError, match=r"\(0, 1\]"):
        tr.get_method("tome", keep_ratio=bad)


def test_budget_needs_exactly_one_form():
    with pytest.raises(tr.BudgetError, match="not both"):
        tr.get_method("tome", r=4, keep_ratio=0.5)
    with pytest.raises(tr.BudgetError, match="needs a budget"):
        tr.get_method("tome")


def test_cls_method_on_siglip_says_why():
    with pytest.raises(tr.StageError, match=r"no \[CLS\]"):
        with tr.apply(tiny("siglip"), tr.get_method("evit", keep_ratio=0.5)):
            pass


def test_method_that_never_fires_raises():
    model = tiny("dinov2")  # 4 blocks
    with pytest.raises(tr.NeverFiredError, match="never reduced"):
        with tr.apply(model, tr.get_method("evit", keep_rate=0.5, locations=(10,))):
            model(pixels(1))
    assert model(pixels(1)).last_hidden_state.shape[1] == 65  # restored after the error


def test_unknown_method_lists_known_ones():
    with pytest.raises(tr.StageError, match="tome"):
        tr.get_method("nope")


def test_list_methods_has_paper_metadata():
    infos = {i.name: i for i in tr.list_methods()}
    assert infos["tome"].arxiv == "2210.09461" and infos["tome"].stage == "encoder"
    assert infos["evit"].arxiv == "2202.07800"
    assert "r" in infos["tome"].native_params
