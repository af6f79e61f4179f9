"""MCTF: one fusion step against a plain reference written from the paper's code description,
a whole forward against a hand-written block loop, and the attachment contract on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, main_output, pixels, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenreduce as tr
import tokenreduce.methods.mctf  # noqa: F401  (registers "mctf")
from tokenreduce.core.method import EncoderInfo
from tokenreduce.core.stats import vit_attention_flops, vit_mlp_flops
from tokenreduce.methods.mctf import fused_count, mctf_counts, mctf_step


# ---------------------------------------------------------------- plain reference (one sample, loops)
def ref_step(x, attn, size, r, num_prefix=1, taus=(1.0, 20.0, 40.0), bidirectional=True, pooling="attention"):
    """One MCTF fusion of one sample: x [N, C], attn [H, N, N], size [N] -> (groups, x', size', attn')."""
    tau_sim, tau_info, tau_size = taus
    n = x.shape[0]
    a_tok, b_tok = list(range(0, n, 2)), list(range(1, n, 2))
    unit = [x[t] / x[t].norm() for t in range(n)]
    received = attn.mean(dim=(0, 1))  # attention each token receives
    inv_a = [1 / float(received[t]) for t in range(n)]
    inv_s = [1 / float(size[t]) for t in range(n)]
    score = [[-math.inf] * len(b_tok) for _ in a_tok]
    for i, ti in enumerate(a_tok):
        for j, tj in enumerate(b_tok):
            if ti < num_prefix or tj < num_prefix:
                continue
            w = ((float(unit[ti] @ unit[tj]) + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
            if tau_info:
                w *= (inv_a[ti] / max(inv_a) * inv_a[tj] / max(inv_a)) ** (1 / tau_info)
            if tau_size:
                w *= (inv_s[ti] / max(inv_s) * inv_s[tj] / max(inv_s)) ** (1 / tau_size)
            score[i][j] = w
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    # step 1: the r1 A tokens with the best match go to their best B token
    best = [max(range(len(b_tok)), key=lambda j: score[i][j]) for i in range(len(a_tok))]
    order = sorted(range(len(a_tok)), key=lambda i: -score[i][best[i]])
    sources, unmerged = order[:r1], sorted(order[r1:])
    into_b = {j: [b_tok[j]] + [a_tok[i] for i in sources if best[i] == j] for j in range(len(b_tok))}
    groups = [[a_tok[i]] for i in unmerged]
    if bidirectional:  # step 2: the r2 B tokens with the best match among the unmerged A go there
        best2 = [max(range(len(unmerged)), key=lambda u: score[unmerged[u]][j]) for j in range(len(b_tok))]
        order2 = sorted(range(len(b_tok)), key=lambda j: -score[unmerged[best2[j]]][j])
        for j in order2[:r2]:
            groups[best2[j]] += into_b[j]
        kept_b = order2[r2:]
    else:
        kept_b = list(range(len(b_tok)))
    groups += [into_b[j] for j in kept_b]
    weight = {"attention": received * size, "size": size, "mean": torch.ones_like(size)}[pooling]
    new_x = torch.stack([sum(weight[t] * x[t] for t in g) / sum(weight[t] for t in g) for g in groups])
    new_size = torch.stack([sum(size[t] for t in g) for g in groups])
    heads = attn.shape[0]
    new_attn = torch.zeros(heads, len(groups), len(groups), dtype=attn.dtype)
    for h in range(heads):
        for p, gq in enumerate(groups):
            for q, gk in enumerate(groups):
                rows = [weight[t] * sum(attn[h, t, k] for k in gk) for t in gq]
                new_attn[h, p, q] = sum(rows) / sum(weight[t] for t in gq)
    return groups, new_x, new_size, new_attn


def random_case(seed, n, batch=2, heads=3, channels=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g)
    attn = (2 * torch.randn(batch, heads, n, n, generator=g)).softmax(-1)
    size = torch.randint(1, 5, (batch, n), generator=g).float()
    return x, attn, size


def check_against_reference(x, attn, size, r, **kw):
    taus = kw.get("taus", (1.0, 20.0, 40.0))
    red, fused = mctf_step(x, attn, size, r, 1, *taus, kw.get("bidirectional", True), kw.get("pooling", "attention"))
    out, out_size, covers = red.apply(x), red.sizes(size), red.covers()
    for b in range(x.shape[0]):
        groups, rx, rs, ra = ref_step(x[b], attn[b], size[b], r, **kw)
        assert [sorted(g) for g in groups] == [covers[b, m].nonzero().flatten().tolist() for m in range(len(groups))]
        assert out.shape[1] == len(groups) == x.shape[1] - r
        assert torch.allclose(out[b], rx, atol=1e-5)
        assert torch.allclose(out_size[b], rs)
        assert torch.allclose(fused[b], ra, atol=1e-5)
        assert torch.allclose(fused[b].sum(-1), torch.ones(()))  # rows stay distributions


def test_one_step_matches_reference_defaults():
    x, attn, size = random_case(0, 17)
    check_against_reference(x, attn, size, 6)
    check_against_reference(x, attn, torch.ones_like(size), 7)  # the first fusion: sizes all one


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(5, 22), r_frac=st.floats(0.0, 1.0),
       pooling=st.sampled_from(["attention", "size", "mean"]), bidirectional=st.booleans(),
       taus=st.sampled_from([(1.0, 20.0, 40.0), (0.0, 20.0, 40.0), (1.0, 0.0, 0.0), (2.0, 5.0, 10.0)]))
def test_one_step_matches_reference_property(seed, n, r_frac, pooling, bidirectional, taus):
    x, attn, size = random_case(seed, n)
    r = int(r_frac * ((n - 1) // 2))
    check_against_reference(x, attn, size, r, taus=taus, bidirectional=bidirectional, pooling=pooling)


def test_fused_count_follows_the_reference_guard_and_clamp():
    assert fused_count(16, 197, 1) == 16
    assert fused_count(16, 21, 1) == 10  # 21 - 16 < 10 -> r = 11, then the (t - 1) // 2 clamp
    assert fused_count(5, 12, 1) == 2  # guard: 12 - 5 < 10 -> r = 2
    assert fused_count(5, 10, 1) == 0 and fused_count(5, 8, 1) == 0
    assert fused_count(0.35, 197, 1) == int(196 * 0.35)
    assert fused_count(0.4, 11, 1) == 4  # a fraction passes the guard: 11 -> 7 tokens, as in the reference
    assert mctf_counts(197, 1, 12, range(1, 12), 16, 1) == [197 - 16 * i for i in range(11)] + [21]


# ---------------------------------------------------------------- tiny DINOv2 (17 tokens)
def dinov2_17(layers=4):
    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=56, patch_size=14,
                          mlp_ratio=2)
    model = tf.Dinov2Model(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def px(batch, size=56, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_keep_ratio_one_and_r_zero_equal_the_plain_model():
    model, x = dinov2_17(), px(2)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        for kw in (dict(keep_ratio=1.0), dict(r=0)):
            with tr.apply(model, tr.get_method("mctf", **kw)) as h:
                out = model(x).last_hidden_state
            assert (out - ref).abs().max() <= 1e-5, kw
            assert h.stats.flops_ratio == 1.0


@pytest.mark.parametrize("r, counts", [(3, [17, 14, 11, 10]), (0.4, [17, 11, 7, 7]), (8, [17, 10, 10, 10])])
def test_token_counts_follow_the_schedule(r, counts):
    model = dinov2_17()
    assert mctf_counts(17, 1, 4, range(1, 4), r, 1) == counts
    with torch.no_grad(), tr.apply(model, tr.get_method("mctf", r=r)) as h:
        out = model(px(2)).last_hidden_state
    assert out.shape[1] == counts[-1]
    assert h.stats.mlp_tokens_per_layer == counts
    assert h.stats.tokens_per_layer == [17] + counts[:-1]  # tokens entering each block (fused before attention)
    assert 0 < h.stats.scoring_flops and h.stats.flops < h.stats.flops_full


def test_batch_equals_one_at_a_time():
    model, x = dinov2_17(), px(3, seed=1)
    for kw in (dict(r=3), dict(r=3, one_step_ahead=0), dict(r=3, one_step_ahead=2)):
        with torch.no_grad(), tr.apply(model, tr.get_method("mctf", **kw)):
            batched = model(x).last_hidden_state
            single = torch.cat([model(x[i : i + 1]).last_hidden_state for i in range(3)])
        assert (batched - single).abs().max() <= 1e-5, kw


def test_model_restored_exactly_also_after_an_exception():
    model, x = dinov2_17(), px(2)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(x).last_hidden_state
        with tr.apply(model, tr.get_method("mctf", r=3)):
            assert model(x).last_hidden_state.shape[1] == 10
        assert torch.equal(model(x).last_hidden_state, ref)
        with pytest.raises(RuntimeError, match="boom"):
            with tr.apply(model, tr.get_method("mctf", r=3)):
                model(x)
                raise RuntimeError("boom")
        assert torch.equal(model(x).last_hidden_state, ref)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- a whole forward by hand
def hand_forward(model, x, r, one_step_ahead):
    """DINOv2 with MCTF, written as the reference Block_DEIT orders it, one sample at a time."""
    outs = []
    for s in range(x.shape[0]):
        h = model.embeddings(x[s : s + 1])[0]
        size = torch.ones(h.shape[0])
        blocks = model.encoder.layer
        for i, blk in enumerate(blocks):
            att = blk.attention
            heads, d = att.num_attention_heads, att.head_dim

            def split(t):
                return t.view(t.shape[0], heads, d).transpose(0, 1)

            def probs(tokens, size):
                z = blk.norm1(tokens)
                q, k = split(att.q_proj(z)), split(att.k_proj(z))
                return (q @ k.transpose(-1, -2) * att.scaling + size.log()).softmax(-1)

            def attend(tokens, p):
                v = split(att.v_proj(blk.norm1(tokens)))
                o = (p @ v).transpose(0, 1).reshape(tokens.shape[0], -1)
                return tokens + blk.layer_scale1(att.o_proj(o))

            active = i >= 1
            rr = fused_count(r, h.shape[0], 1)
            if one_step_ahead and active and rr > 0:
                a = probs(h, size)
                _, h, new_size, fused = ref_step(h, a, size, rr)
                size = new_size
                h = attend(h, fused if one_step_ahead == 1 else probs(h, size))
            else:
                a = probs(h, size)
                h = attend(h, a)
            h = h + blk.layer_scale2(blk.mlp(blk.norm2(h)))
            if not one_step_ahead and active and i < len(blocks) - 1 and rr > 0:
                _, h, size, _ = ref_step(h, a, size, rr)
        outs.append(model.layernorm(h))
    return torch.stack(outs)


@pytest.mark.parametrize("one_step_ahead", [1, 2, 0])
def test_whole_forward_matches_hand_written_blocks(one_step_ahead):
    model, x = dinov2_17(), px(2, seed=3)
    with torch.no_grad():
        ref = hand_forward(model, x, 3, one_step_ahead)
        with tr.apply(model, tr.get_method("mctf", r=3, one_step_ahead=one_step_ahead)):
            out = model(x).last_hidden_state
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- every family, budgets, flops
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_fuses_and_is_restored(family):
    model, x = tiny(family), pixels(2)
    with torch.no_grad():
        ref = main_output(model(x))
        with tr.apply(model, tr.get_method("mctf", keep_ratio=0.5), track_source=True) as h:
            out = main_output(model(x))
        assert torch.isfinite(out).all()
        n0 = h.stats.tokens_per_layer[0]
        assert abs(sum(h.stats.mlp_tokens_per_layer) / (4 * n0) - 0.5) < 0.1
        covers = h.source.covers()
        assert torch.equal(covers.sum(1), torch.ones_like(covers[:, 0], dtype=torch.long))  # fusion drops nothing
        p = 2 if family == "deit" else (0 if family == "siglip" else 1)
        for k in range(p):  # protected tokens stay alone, in front, in order
            assert covers[:, k, k].all() and covers[:, k].sum(-1).eq(1).all()
        assert torch.equal(main_output(model(x)), ref)


def test_keep_ratio_solves_r_and_flops_count_the_probe():
    model, x = tiny("dinov2"), pixels(1)  # 65 tokens, hidden 64, MLP 128
    meth = tr.get_method("mctf", keep_ratio=0.6)
    with torch.no_grad(), tr.apply(model, meth) as h:
        model(x)
    counts = mctf_counts(65, 1, 4, range(1, 4), meth._r, 1)
    assert h.stats.mlp_tokens_per_layer == counts
    best = min(range(40), key=lambda r: abs(sum(mctf_counts(65, 1, 4, range(1, 4), r, 1)) / (4 * 65) - 0.6))
    assert meth._r == best
    c, f, info = 64, 128, EncoderInfo("dinov2", 4, 64, 4, 1, 128)
    entering = [65] + counts[:-1]
    # each fusing block: a probe (Q/K/V projections and Q K^T on the unfused tokens) + MCTF's own work
    scoring = sum(2 * n * c * 3 * c + 2 * n * n * c + meth.scoring_flops_before_attention(i, n, info)
                  for i, n in enumerate(entering) if i >= 1)
    assert h.stats.scoring_flops == pytest.approx(scoring)
    # fused blocks attend with the fused map: no Q K^T of their own, everything else on the fused tokens
    blocks = sum(vit_attention_flops(m, c) - (2 * m * m * c if i >= 1 else 0) + vit_mlp_flops(m, c, f)
                 for i, m in enumerate(counts))
    assert h.stats.flops == pytest.approx(blocks + scoring)


def test_bad_parameters_say_what_is_allowed():
    with pytest.raises(tr.BudgetError, match="not both"):
        tr.get_method("mctf", r=4, keep_ratio=0.5)
    with pytest.raises(tr.BudgetError, match="fraction"):
        tr.get_method("mctf", r=1.5)
    with pytest.raises(tr.BudgetError, match="precise"):
        tr.get_method("mctf", r=4, one_step_ahead=3)
    with pytest.raises(tr.BudgetError, match="linear"):
        tr.get_method("mctf", r=4, pooling="max")


def test_never_fires_outside_the_blocks():
    with pytest.raises(tr.NeverFiredError):
        with tr.apply(dinov2_17(), tr.get_method("mctf", r=2, layers=[7])) as h:
            h.model(px(1))


# ---------------------------------------------------------------- real DINOv2
@pytest.mark.slow
def test_real_dinov2_half_budget(real_dinov2, photo_pixels):
    x = photo_pixels[:2]
    with torch.inference_mode():
        ref = real_dinov2(x).pooler_output
        with tr.apply(real_dinov2, tr.get_method("mctf", keep_ratio=0.5)) as h:
            out = real_dinov2(x).pooler_output
    cos = torch.nn.functional.cosine_similarity(out, ref)
    print("mctf keep_ratio=0.5 CLS cosine:", cos.tolist(), "flops_ratio:", h.stats.flops_ratio)
    assert (cos > 0.8).all(), cos
    assert abs(h.stats.flops_ratio - 0.5) < 0.1, h.stats.flops_ratio
