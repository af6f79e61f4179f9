"""Token Transforming (arXiv 2506.05709): one step against a plain reference, properties of the
many-to-many map, the hard-merge special case, tiny and real DINOv2."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import pixels, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
import tokenreduce.methods.token_transforming  # noqa: F401  (registers "token_transforming")
from tokenreduce import Reduction
from tokenreduce.core.errors import BudgetError, StageError
from tokenreduce.core.method import EncoderInfo
from tokenreduce.core.tokens import TokenState
from tokenreduce.methods.token_transforming import TokenTransforming, choose_targets, transform_matrix

settings.register_profile("token_transforming", max_examples=40, deadline=None)
settings.load_profile("token_transforming")


def info(num_prefix: int, layers: int = 1, hidden: int = 12, heads: int = 3) -> EncoderInfo:
    return EncoderInfo(family="test", num_layers=layers, hidden_size=hidden, num_heads=heads, num_prefix=num_prefix,
                       mlp_size=4 * hidden)


def case(seed: int, b: int, n: int, p: int, heads: int = 3, d: int = 4, c: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, heads, n, d, generator=g, dtype=dtype)
    x = torch.randn(b, n, c, generator=g, dtype=dtype)
    sizes = (torch.rand(b, n, generator=g, dtype=torch.float64) * 3 + 0.5).float()
    cls_attn = torch.rand(b, heads, n, generator=g, dtype=dtype).softmax(-1)
    return keys, x, sizes, cls_attn


# ------------------------------------------------------------------ plain reference (loops)
def reference_step(x, keys, sizes, cls_attn, p, r, k, temperature, criterion):
    """One Token Transforming step written from the description, for one image, with loops.

    Returns the reduced tokens and their sizes (the core's dense rule, written out).
    """
    n = x.shape[0]
    metric = keys.mean(0)
    metric = [metric[i] / metric[i].norm() for i in range(n)]
    cos = lambda i, j: float(metric[i] @ metric[j])
    patches = list(range(p, n))
    if criterion == "cls_attn":
        importance = {i: float(cls_attn[:, i].mean()) for i in patches}
        sources = sorted(patches, key=lambda i: importance[i])[:r]
    else:
        a_side, b_side = patches[0::2], patches[1::2]
        best = {i: max(cos(i, j) for j in b_side) for i in a_side}
        sources = sorted(a_side, key=lambda i: -best[i])[:r]
    targets = [i for i in patches if i not in sources]
    slots = list(range(p)) + targets
    m = len(slots)
    share = [[0.0] * m for _ in range(n)]  # share[j][i]: how much of token j goes to slot i
    for j in range(p):
        share[j][j] = 1.0
    for j in patches:
        if j in targets:
            share[j][slots.index(j)] = 1.0
            continue
        ranked = sorted(targets, key=lambda t: -cos(j, t))[: min(k, len(targets))]
        if temperature == 0:
            ranked = ranked[:1]
        e = [math.exp((cos(j, t) - cos(j, ranked[0])) / temperature) if temperature else 1.0 for t in ranked]
        for t, v in zip(ranked, e):
            share[j][slots.index(t)] = v / sum(e)
    out = torch.zeros(m, x.shape[1], dtype=x.dtype)
    mat = [[float(sizes[j]) * share[j][i] for j in range(n)] for i in range(m)]
    for i in range(m):
        total = sum(mat[i])
        mat[i] = [v / total for v in mat[i]]
        for j in range(n):
            out[i] += mat[i][j] * x[j]
    new_sizes = torch.zeros(m, dtype=torch.float64)
    for j in range(n):
        col = sum(mat[i][j] for i in range(m))
        for i in range(m):
            new_sizes[i] += float(sizes[j]) * mat[i][j] / col
    return out, new_sizes


@pytest.mark.parametrize("criterion,p,k,temperature", [
    ("similarity", 1, 3, 0.1), ("similarity", 2, 1, 0.05), ("cls_attn", 1, 2, 0.2), ("similarity", 0, 4, 0.0),
    ("cls_attn", 1, 50, 1.0),
])
def test_one_step_matches_plain_reference(criterion, p, k, temperature):
    b, n, r = 2, 13, 4
    keys, x, sizes, cls_attn = case(7, b, n, p)
    method = TokenTransforming(r=r, k=k, temperature=temperature, criterion=criterion)
    method.start(info(p), n)
    state = TokenState(sizes=sizes.clone(), num_prefix=p)
    red = method.reduce(0, x, state, {"keys": keys, "cls_attn": cls_attn})
    assert red.is_dense and red.matrix.shape == (b, n - r, n)
    out = state.apply(red, x)
    for i in range(b):
        want, want_sizes = reference_step(x[i], keys[i], sizes[i], cls_attn[i], p, r, k, temperature, criterion)
        assert torch.allclose(out[i], want, atol=1e-6, rtol=0)
        assert torch.allclose(state.sizes[i].double(), want_sizes, atol=1e-5, rtol=0)  # sizes are float32


# ------------------------------------------------------------------ properties
@st.composite
def plans(draw):
    b = draw(st.integers(1, 3))
    p = draw(st.integers(0, 2))
    n = p + draw(st.integers(2, 16))
    r = draw(st.integers(1, (n - p) // 2))
    k = draw(st.one_of(st.none(), st.integers(1, 6)))
    temperature = draw(st.sampled_from([0.0, 0.01, 0.1, 1.0, 10.0]))
    criterion = draw(st.sampled_from(["similarity", "cls_attn"]))
    seed = draw(st.integers(0, 2**16))
    return b, n, p, r, k, temperature, criterion, seed


def plan(b, n, p, r, k, temperature, criterion, seed):
    keys, x, sizes, cls_attn = case(seed, b, n, p)
    method = TokenTransforming(r=r, k=k, temperature=temperature, criterion=criterion)
    method.start(info(p), n)
    red = method.reduce(0, x, TokenState(sizes=sizes, num_prefix=p), {"keys": keys, "cls_attn": cls_attn})
    return red, x, sizes, keys


@given(plans())
def test_rows_are_convex_combinations_and_size_is_conserved(params):
    b, n, p, r = params[:4]
    red, x, sizes, _ = plan(*params)
    t = red.matrix
    assert t.shape == (b, n - r, n)
    assert bool((t >= 0).all())
    assert torch.allclose(t.sum(-1), torch.ones(b, n - r, dtype=t.dtype), atol=1e-12)
    assert torch.allclose(red.sizes(sizes).sum(1), sizes.sum(1), atol=1e-4)
    assert bool(red.valid().all())  # every output is a real token


@given(plans())
def test_prefix_tokens_pass_unchanged(params):
    b, n, p, r = params[:4]
    red, x, sizes, _ = plan(*params)
    out = red.apply(x)
    assert torch.equal(out[:, :p], x[:, :p])
    assert bool((red.matrix[:, :p, p:] == 0).all())  # nothing flows into a prefix token
    assert bool((red.matrix[:, p:, :p] == 0).all())  # and a prefix token feeds nothing else
    assert torch.equal(red.sizes(sizes)[:, :p], sizes[:, :p])


def hard_merge_dest(keys, n, p, targets):
    """Each patch token joins its most similar target (a target is its own most similar)."""
    metric = keys.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    b = keys.shape[0]
    dest = torch.empty(b, n, dtype=torch.long)
    for i in range(b):
        tgt = [p + int(t) for t in targets[i]]
        for j in range(n):
            if j < p:
                dest[i, j] = j
            elif j in tgt:
                dest[i, j] = p + tgt.index(j)
            else:
                dest[i, j] = p + max(range(len(tgt)), key=lambda s: float(metric[i, j] @ metric[i, tgt[s]]))
    return dest


@given(plans(), st.sampled_from(["k1", "t0"]))
def test_k1_or_zero_temperature_is_a_hard_merge(params, which):
    b, n, p, r, k, temperature, criterion, seed = params
    k, temperature = (1, temperature) if which == "k1" else (k, 0.0)
    red, x, sizes, keys = plan(b, n, p, r, k, temperature, criterion, seed)
    metric = keys.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    _, _, _, cls_attn = case(seed, b, n, p)
    targets = choose_targets(metric, r, p, criterion, cls_attn.mean(1)[:, p:])
    hard = Reduction.merge(hard_merge_dest(keys, n, p, targets), n - r, sizes.double())
    assert torch.allclose(red.matrix, hard.to_dense(), atol=1e-12)
    assert torch.allclose(red.sizes(sizes), hard.sizes(sizes), atol=1e-5)
    assert bool(((red.matrix != 0).sum(1) == 1).all())  # many-to-one: every input feeds one output


def test_small_temperature_tends_to_the_hard_merge():
    keys, x, sizes, cls_attn = case(3, 2, 17, 1)
    plans_ = []
    for temperature in (1e-4, 0.0):
        m = TokenTransforming(r=6, k=4, temperature=temperature)
        m.start(info(1), 17)
        plans_.append(m.reduce(0, x, TokenState(sizes=sizes, num_prefix=1), {"keys": keys}).matrix)
    assert torch.allclose(plans_[0], plans_[1], atol=1e-6)


def test_soft_assignment_is_many_to_many():
    keys, x, sizes, _ = case(5, 2, 33, 1)
    m = TokenTransforming(r=12, k=3, temperature=1.0)
    m.start(info(1), 33)
    t = m.reduce(0, x, TokenState(sizes=sizes, num_prefix=1), {"keys": keys}).matrix
    assert bool(((t != 0).sum(1) == 3).any())  # an input feeds several outputs
    assert bool(((t != 0).sum(2) > 1).any())  # an output draws on several inputs


def test_padded_tokens_contribute_nothing():
    b, n, p = 2, 15, 1
    keys, x, sizes, _ = case(11, b, n, p)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, -3:] = False
    metric = keys.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    targets = choose_targets(metric, 4, p, "similarity", valid=valid)
    t = transform_matrix(metric, sizes, p, targets, 3, 0.1, valid)
    assert bool((t[1, :, -3:] == 0).all())  # padding feeds no output
    slot_valid = torch.cat([valid[:, :p], valid[:, p:].gather(1, targets)], 1)
    assert not bool(slot_valid[0].logical_not().any()) and int(slot_valid[1].sum()) < n - 4  # padding kept as a slot
    rows = t.sum(-1)
    assert torch.allclose(rows[slot_valid], torch.ones_like(rows[slot_valid]))  # real outputs: convex combinations
    assert bool((rows[~slot_valid] == 0).all())  # padded slots stay empty ...
    assert torch.equal(Reduction.dense(t).valid(valid), slot_valid)  # ... and are marked as padding


def test_scoring_flops_count_similarities_and_the_dense_product():
    m = TokenTransforming(r=[8, 0], k=2)
    inf = info(1, layers=2, hidden=384, heads=6)
    m.start(inf, 257)
    n, mm, c, d = 257, 249, 384, 64
    assert m.scoring_flops(1, n, inf) == 0.0  # r = 0 there: nothing planned, nothing applied
    f = m.scoring_flops(0, n, inf)
    assert f >= 2 * mm * n * c + 2 * (n - 1) * (mm - 1) * d  # T @ X and every patch token vs every target
    assert f < 1.2 * (2 * mm * n * c + 2 * (n - 1) * (mm - 1) * d + 2 * 128 * 128 * d)


def test_bad_parameters_say_what_to_do():
    with pytest.raises(BudgetError, match="keep_ratio"):
        TokenTransforming()
    with pytest.raises(BudgetError, match="not both"):
        TokenTransforming(r=2, keep_ratio=0.5)
    with pytest.raises(BudgetError, match="k"):
        TokenTransforming(r=2, k=0)
    with pytest.raises(BudgetError, match="temperature"):
        TokenTransforming(r=2, temperature=-1.0)
    with pytest.raises(BudgetError, match="criterion"):
        TokenTransforming(r=2, criterion="norm")


# ------------------------------------------------------------------ tiny random DINOv2
def test_keep_ratio_one_and_r_zero_equal_the_plain_model():
    model, x = tiny("dinov2"), pixels(2)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        for kw in (dict(keep_ratio=1.0), dict(r=0)):
            with tr.apply(model, tr.get_method("token_transforming", **kw)) as h:
                out = model(x).last_hidden_state
            assert torch.equal(out, ref), kw
            assert h.stats.flops_ratio == 1.0 and h.stats.scoring_flops == 0.0


def test_batch_equals_per_image_and_model_is_restored():
    model, x = tiny("dinov2"), pixels(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {name: mod.__dict__.get("forward") for name, mod in model.named_modules()}
    with torch.no_grad():
        ref = model(x).last_hidden_state
        with tr.apply(model, tr.get_method("token_transforming", keep_ratio=0.5, k=3, temperature=0.1)) as h:
            batch = model(x).last_hidden_state
            single = torch.cat([model(x[i : i + 1]).last_hidden_state for i in range(3)])
        assert batch.shape[1] < ref.shape[1]
        assert torch.allclose(batch, single, atol=1e-5)
        s = h.stats
        kept = sum(s.mlp_tokens_per_layer) / (len(s.mlp_tokens_per_layer) * s.tokens_per_layer[0])
        assert abs(kept - 0.5) < 0.1
        assert 0 < s.scoring_flops and s.flops_ratio < 0.85
        assert torch.equal(model(x).last_hidden_state, ref)
    assert {name: mod.__dict__.get("forward") for name, mod in model.named_modules()} == forwards
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_k1_model_equals_hard_merge_model():
    """Through the whole model, temperature 0 and k=1 plan the same hard merges."""
    model, x = tiny("dinov2"), pixels(2)
    with torch.no_grad():
        outs = []
        for kw in (dict(k=1), dict(k=5, temperature=0.0)):
            with tr.apply(model, tr.get_method("token_transforming", r=8, **kw)):
                outs.append(model(x).last_hidden_state)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_cls_attn_needs_a_cls_token_but_similarity_does_not():
    model, x = tiny("siglip"), pixels(1)
    with pytest.raises(StageError, match="criterion='similarity'"):
        with tr.apply(model, tr.get_method("token_transforming", r=4, criterion="cls_attn")):
            pass
    with torch.no_grad(), tr.apply(model, tr.get_method("token_transforming", r=4)) as h:
        model(x)
    assert h.stats.mlp_tokens_per_layer[-1] == 64 - 16


# ------------------------------------------------------------------ real DINOv2-S
@pytest.mark.slow
def test_real_dinov2_half_budget_keeps_the_cls_output(real_dinov2):
    from tokenreduce.assets import natural_photos, preprocess

    x = preprocess([p for _, p in natural_photos()[:2]])
    with torch.no_grad():
        ref = real_dinov2(pixel_values=x).last_hidden_state[:, 0]
        with tr.apply(real_dinov2, tr.get_method("token_transforming", keep_ratio=0.5)) as h:
            out = real_dinov2(pixel_values=x).last_hidden_state[:, 0]
    cos = torch.nn.functional.cosine_similarity(out, ref)
    print(f"token_transforming keep_ratio=0.5: CLS cosine {cos.tolist()}, flops_ratio {h.stats.flops_ratio:.3f}, "
          f"scoring share {h.stats.scoring_flops / h.stats.flops:.3f}")
    assert float(cos.mean()) > 0.9 and float(cos.min()) > 0.85  # random drop / pooling: 0.89 / 0.90 mean
    assert h.stats.flops_ratio < 0.6
