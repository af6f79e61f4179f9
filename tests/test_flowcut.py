"""FlowCut (the vision-tower stage) against a plain reference written from the paper and its reference code.

The plain reference runs a CLIP tower image by image with eager attention and prunes each block's output after its
MLP, as the reference code does; the method prunes between attention and MLP. The kept tokens must be the same at
every reducing block, and so must the tower's output.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import IMAGE, PATCH, pixels, tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_vlm import _config, one, vlm_batch

import tokenreduce as tr
from tokenreduce.core.budget import mean_kept
from tokenreduce.methods.flowcut import drop_count, token_counts

PATCHES = (IMAGE // PATCH) ** 2  # 64


# ---------------------------------------------------------------------------- models
def sharpen(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Scale every attention's Q and K weights: random tiny models attend almost uniformly ([CLS] entropy ~0.9995,
    so FlowCut would drop nothing before its last block); sharper attention makes its entropy rule drop tokens."""
    for module in model.modules():
        if isinstance(module, tf.models.clip.modeling_clip.CLIPAttention):
            module.q_proj.weight.data *= factor
            module.k_proj.weight.data *= factor
    return model


def clip(layers: int = 7, factor: float = 12.0) -> tf.CLIPVisionModel:
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH)
    model = tf.CLIPVisionModel(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return sharpen(model, factor)


# ---------------------------------------------------------------------------- the plain reference
def plain_flowcut(model: tf.CLIPVisionModel, image: torch.Tensor, target_num: int):
    """One image [3, H, W] through the CLIP tower with FlowCut, written from the paper and the reference code.

    Every block: eager attention, the MLP, then (while more than ``target_num`` patch tokens are left) the score
    (relation + semantic) * ||v||_1 accumulated as 0.5 old + 0.5 new; with ``k = L - 1 - block`` blocks left and
    ``k`` even, drop round((n - target) / sqrt(k) * (1 - H^2)) tokens (k = 0: down to the target), keeping the best
    in token order. Returns the tower's output [1 + target, C] and {block: kept patch indices of the input}.
    """
    enc = model.vision_model if hasattr(model, "vision_model") else model
    h = enc.pre_layrnorm(enc.embeddings(image[None]))[0]  # [N, C]
    origin = torch.arange(h.shape[0] - 1)  # input index (among patches) of each current patch token
    layers = enc.encoder.layers
    flow, kept = None, {}
    for block, layer in enumerate(layers):
        attn = layer.self_attn
        heads, d = attn.num_heads, attn.head_dim
        y = layer.layer_norm1(h)
        q, k, v = (proj(y).view(-1, heads, d).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # [heads, N, N]
        h = h + attn.out_proj((probs @ v).transpose(0, 1).reshape(-1, heads * d))
        h = h + layer.mlp(layer.layer_norm2(h))
        n = h.shape[0] - 1
        if n <= target_num:
            continue
        relation = probs[:, 0, 1:].mean(0)
        semantic = (v[:, :1] @ v.transpose(-1, -2))[:, 0].softmax(-1).mean(0)[1:]
        magnitude = v.mean(0)[1:].abs().sum(-1)
        score = (relation / relation.sum() + semantic / semantic.sum()) * magnitude
        flow = score if flow is None else 0.5 * flow + 0.5 * score
        left = len(layers) - 1 - block
        if left % 2:
            continue
        if left == 0:
            keep = target_num
        else:
            p = relation / relation.sum()
            entropy = -torch.special.xlogy(p, p).sum() / math.log(n)
            r = (n - target_num) / math.sqrt(left) * (1 - entropy.double() ** 2)
            keep = max(n - int(torch.round(r)), target_num)
        best = flow.topk(keep).indices.sort().values
        h = torch.cat([h[:1], h[1:][best]])
        flow, origin = flow[best], origin[best]
        kept[block] = origin.tolist()
    return h, kept


def run_recording(model, method, x, **apply_kw):
    """Our forward; {block: [kept input patch indices per sample]} at every block where the method reduced."""
    b, n = x.shape[0], PATCHES + 1
    origin = torch.arange(n).expand(b, n)
    kept = {}
    plan = method.reduce

    def recording(layer, hidden, tokens, signals):
        nonlocal origin
        red = plan(layer, hidden, tokens, signals)
        if red is not None:
            index = red.keep_index
            origin = torch.where(index >= 0, origin.gather(1, index.clamp_min(0)), -1)
            kept[layer] = [[i - 1 for i in row if i >= 1] for row in origin.tolist()]
        return red

    method.reduce = recording
    try:
        with torch.no_grad(), tr.apply(model, method, **apply_kw) as h:
            out = model(x)
    finally:
        del method.reduce
    return out, kept, h.stats


# ---------------------------------------------------------------------------- (a) the plain reference
@pytest.mark.parametrize("target_num", [20, 5])
def test_kept_tokens_match_the_plain_reference_at_every_block(target_num):
    model, x = clip(), pixels(3, 5)
    out, kept, _ = run_recording(model, tr.get_method("flowcut", target_num=target_num), x)
    with torch.no_grad():
        refs = [plain_flowcut(model, img, target_num) for img in x]
    assert set(kept) == set().union(*(r[1] for r in refs)), "the reducing blocks differ"
    assert max(kept) == 6 and len(kept) >= 2, "the schedule was not exercised before the last block"
    for i, (ref_out, ref_kept) in enumerate(refs):
        for block, want in ref_kept.items():
            assert kept[block][i] == want, f"image {i}, block {block}"
        assert torch.allclose(out.last_hidden_state[i], ref_out, atol=1e-5)
    assert out.last_hidden_state.shape[1] == 1 + target_num
    counts = {tuple(len(kept[b][i]) for b in sorted(kept)) for i in range(3)}
    assert len(counts) > 1, "every image kept the same counts: per-sample counts were not exercised"


def test_deit_keeps_both_prefix_tokens_in_front():
    model, x = tiny("deit"), pixels(2, 1)
    with torch.no_grad(), tr.apply(model, tr.get_method("flowcut", target_num=10), track_source=True) as h:
        out = model(x).last_hidden_state
        source = h.source.keep_index
    assert out.shape[1] == 2 + 10
    assert source[:, :2].tolist() == [[0, 1], [0, 1]]
    assert (source[:, 2:].diff(dim=1) > 0).all(), "kept tokens are in token order"


# ---------------------------------------------------------------------------- the count schedule
@settings(max_examples=200, deadline=None)
@given(patches=st.integers(2, 600), layers=st.integers(1, 26), data=st.data())
def test_the_schedule_ends_at_the_target_and_never_below(patches, layers, data):
    target = data.draw(st.integers(1, patches))
    entropies = data.draw(st.lists(st.floats(0.0, 1.0), min_size=layers, max_size=layers))
    counts = token_counts(patches + 1, 1, layers, target, entropies)
    assert counts[-1] == 1 + target
    assert all(c >= 1 + target for c in counts)
    assert all(a >= b for a, b in zip([patches + 1] + counts, counts))  # never grows
    # concentrated attention (H = 0) drops the most: any entropies keep at least as many tokens at every block
    assert all(a >= b for a, b in zip(counts, token_counts(patches + 1, 1, layers, target)))
    # the batched count (tensors, per sample) is the one-sample count
    n, k, h = data.draw(st.integers(target, patches)), 2 * data.draw(st.integers(1, 12)), entropies[0]
    assert int(drop_count(torch.tensor([n]), target, k, torch.tensor([h], dtype=torch.float32))) == \
        drop_count(n, target, k, float(torch.tensor(h, dtype=torch.float32)))


def test_drop_count_is_the_papers_rule():
    assert drop_count(576, 64, 20, 0.0) == round(512 / math.sqrt(20))  # 114
    assert drop_count(576, 64, 20, 1.0) == 0
    assert drop_count(100, 64, 0, 0.7) == 36  # the last block: down to the target
    assert drop_count(3, 1, 4, 0.0) == 1  # 1.0
    assert drop_count(2, 1, 2, 0.0) == 1  # round(0.707)


# ---------------------------------------------------------------------------- budgets
def test_keep_ratio_is_met_at_concentrated_attention_and_kept_at_least_otherwise():
    model, x = clip(), pixels(2, 4)
    for ratio in (0.3, 0.5, 0.8):
        m = tr.get_method("flowcut", keep_ratio=ratio)
        with torch.no_grad(), tr.apply(model, m) as h:
            model(x)
        nominal = mean_kept(token_counts(PATCHES + 1, 1, 7, m._target), PATCHES + 1)
        step = 1.0 / (7 * (PATCHES + 1))  # one token at the last block
        assert abs(nominal - ratio) <= 4 * step, (ratio, nominal)
        got = mean_kept(h.stats.mlp_tokens_per_layer, PATCHES + 1)
        assert got >= nominal - 1e-9 and got < 1.0, (ratio, nominal, got)


def test_target_num_is_the_tokens_left_at_the_end():
    model, x = tiny("clip"), pixels(2)
    with torch.no_grad(), tr.apply(model, tr.get_method("flowcut", target_num=7)) as h:
        out = model(x).last_hidden_state
    assert out.shape[1] == 1 + 7 and h.stats.mlp_tokens_per_layer[-1] == 1 + 7


# ---------------------------------------------------------------------------- (b) nothing to drop
@pytest.mark.parametrize("params", [dict(keep_ratio=1.0), dict(target_num=PATCHES), dict(target_num=10_000)])
def test_nothing_to_drop_is_bit_identical(params):
    model, x = clip(layers=4), pixels(2)
    with torch.no_grad():
        ref = model(x)
        with tr.apply(model, tr.get_method("flowcut", **params)) as h:
            out = model(x)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)
    assert h.stats.mlp_tokens_per_layer == [PATCHES + 1.0] * 4


# ---------------------------------------------------------------------------- (c) a batch is its samples
def test_a_batch_equals_its_samples_one_at_a_time():
    model, x = clip(), pixels(4, 7)
    m = tr.get_method("flowcut", target_num=9)
    out, kept, _ = run_recording(model, m, x)
    counts = {tuple(len(kept[b][i]) for b in sorted(kept)) for i in range(len(x))}
    assert len(counts) > 1, "the batch was not padded (every image kept the same counts)"
    for i in range(len(x)):
        alone, kept_alone, _ = run_recording(model, m, x[i:i + 1])
        assert {b: rows[0] for b, rows in kept_alone.items()} == {b: rows[i] for b, rows in kept.items()}
        assert torch.allclose(out.last_hidden_state[i], alone.last_hidden_state[0], atol=1e-5)


# ---------------------------------------------------------------------------- (d) errors before any work
@pytest.mark.parametrize("params, error, match", [
    (dict(), tr.BudgetError, "needs a budget"),
    (dict(target_num=8, keep_ratio=0.5), tr.BudgetError, "not both"),
    (dict(target_num=0), tr.BudgetError, "target_num must be an integer >= 1"),
    (dict(target_num=2.5), tr.BudgetError, "target_num"),
    (dict(target_num=True), tr.BudgetError, "target_num"),
    (dict(keep_ratio=0.0), tr.BudgetError, "keep_ratio"),
    (dict(keep_ratio=1.5), tr.BudgetError, "keep_ratio"),
    (dict(target=8), tr.UnknownParameterError, "did you mean 'target_num'"),
])
def test_bad_parameters_are_refused_at_construction(params, error, match):
    with pytest.raises(error, match=match):
        tr.get_method("flowcut", **params)


def test_a_tower_without_cls_is_refused_at_attach():
    model = tiny("siglip")
    with pytest.raises(tr.StageError, match="no \\[CLS\\]"):
        tr.patch(model, tr.get_method("flowcut", target_num=8))


def test_another_method_reducing_between_its_blocks_is_refused():
    model, x = clip(layers=4), pixels(1)
    methods = tr.get_method("tome", r=4), tr.get_method("flowcut", target_num=8)
    with torch.no_grad(), pytest.raises(tr.StageError, match="only encoder method"), tr.apply(model, *methods):
        model(x)


# ---------------------------------------------------------------------------- (e) inside a VLM's tower
def test_flowcut_in_a_llava_tower_generates_a_batch_as_its_samples():
    """A tiny LLaVA whose CLIP tower has 6 blocks (select layer -2: FlowCut reduces in blocks 0-3, cutting to the
    target at block 3) and sharpened attention, so the images keep different counts inside the tower."""
    cfg = _config("llava")
    cfg.vision_config.num_hidden_layers = 6
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = "sdpa"
    sharpen(model.model.vision_tower, 12.0)
    batch = vlm_batch(model, "llava", [(3, 5), (1, 2), (4, 7)], seed=1)
    m = tr.get_method("flowcut", target_num=6)
    with torch.no_grad(), tr.apply(model, m) as h:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        tower, connector = h.stats_by_stage["encoder"], h.stats_by_stage["connector"]
        singles, counts = [], set()
        for i in range(3):
            singles.append(model.generate(**one(batch, i), max_new_tokens=4, do_sample=False)[0, -4:])
            counts.add(tuple(h.stats_by_stage["encoder"].mlp_tokens_per_layer))
    assert connector.kept_visual_tokens == 6 and connector.visual_tokens == 16
    assert len(tower.mlp_tokens_per_layer) == 4 and tower.mlp_tokens_per_layer[-1] == 7
    assert len(counts) > 1, "every image kept the same counts in the tower: the padded batch was not exercised"
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), i
