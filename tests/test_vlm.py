"""Visual-token stages on tiny VLMs: each method's kept set against a plain reference written from its paper,
positions and masks after pruning, composition, and the errors a user meets first."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from tiny_vlm import IMAGE_ID, TEXT, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.families.encoders import find_encoders

TEXTS = [(3, 5), (1, 2), (4, 7)]


def image_span(ids: torch.Tensor) -> range:
    pos = (ids[0] == IMAGE_ID).nonzero().flatten()
    return range(int(pos[0]), int(pos[-1]) + 1)


def tower_attention(name: str, pixels: torch.Tensor, layer: int = -2):
    """The eager tower's attention map and keys at the select block (the plain reference's inputs)."""
    model = tiny_vlm(name, attn="eager")
    tower = model.model.vision_tower
    fam, _owner, blocks, _config = find_encoders(tower)[0]
    block = len(blocks) + layer
    keys = {}
    attn = fam.attention(blocks[block])
    k_proj = attn.k_proj if hasattr(attn, "k_proj") else attn.key
    h = k_proj.register_forward_hook(lambda m, a, out: keys.setdefault("k", out))
    with torch.no_grad():
        out = tower(pixels, output_attentions=True)
    h.remove()
    heads = attn.num_heads if hasattr(attn, "num_heads") else attn.num_attention_heads
    k = keys["k"].view(pixels.shape[0], -1, heads, keys["k"].shape[-1] // heads).transpose(1, 2)
    return out.attentions[block], k, model


@pytest.mark.parametrize("name", ["llava", "llava_dinov2"])
@pytest.mark.parametrize("keep", [8, 3])
def test_fastervlm_keeps_the_top_cls_attention_patches(name, keep):
    """Plain reference (paper Sec. 3): [CLS] row at the select layer, mean over heads, top-T patches."""
    model = tiny_vlm(name)
    inputs = one(vlm_batch(model, name, TEXTS), 0)
    attn, _, _ = tower_attention(name, inputs["pixel_values"])
    want = attn[0, :, 0, 1:].mean(0).topk(keep).indices.sort().values
    span = image_span(inputs["input_ids"])
    with torch.no_grad(), tr.apply(model, tr.get_method("fastervlm", keep_count=keep)) as h:
        model(**inputs)
    kept = [p - span.start for p in h.stats.kept_positions[0] if p in span]
    assert kept == want.tolist()


def test_visionzip_dominant_and_contextual_tokens_equal_a_plain_reference():
    """Plain reference (paper Sec. 3.2): dominant = top-d [CLS] attention (summed over heads); the rest compared on
    the select layer's keys (mean over heads, L2-normalised), targets at a uniform stride, each other token joins its
    most similar target; a contextual token is the mean of its group. Here on the projected features."""
    name, k = "llava_dinov2", 6
    model = tiny_vlm(name)
    inputs = one(vlm_batch(model, name, TEXTS), 1)
    attn, keys, _ = tower_attention(name, inputs["pixel_values"])
    d, c = k - max(1, round(k * 10 / 64)), max(1, round(k * 10 / 64))
    score = attn[0, :, 0, 1:].sum(0)
    dominant = score.topk(d).indices.sort().values.tolist()
    rest = [i for i in range(16) if i not in dominant]
    metric = keys[0, :, 1:].mean(0)[rest]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // c)
    targets = list(range(0, len(rest), step))[:c]
    groups = {t: [rest[t]] for t in targets}
    for j in range(len(rest)):
        if j not in targets:
            groups[targets[int((metric[j] @ metric[targets].T).argmax())]].append(rest[j])
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    expected = [(i, feats[i]) for i in dominant] + [(min(g), feats[g].mean(0)) for g in groups.values()]
    expected.sort(key=lambda x: x[0])
    seen = {}
    lm = model.model.language_model
    with torch.no_grad(), tr.apply(model, tr.get_method("visionzip", keep_count=k)) as h:
        hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
        model(**inputs)
        hook.remove()
    span = image_span(inputs["input_ids"])
    got_pos = [p for p in h.stats.kept_positions[0] if p in span]
    assert got_pos == [span.start + i for i, _ in expected]
    rows = [h.stats.kept_positions[0].index(p) for p in got_pos]
    got = seen["e"][0, rows]
    assert torch.allclose(got, torch.stack([e for _, e in expected]), atol=1e-6)


def test_connector_output_equals_the_language_model_on_the_kept_tokens_at_their_positions():
    """Plain reference: the language model called on the kept tokens' embeddings, with their original positions
    and an explicit mask, gives the reduced model's logits (positions preserved, nothing else changed)."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 2)
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        embeds = model.model.language_model.embed_tokens(inputs["input_ids"])
        embeds[inputs["input_ids"] == IMAGE_ID] = full
        with tr.apply(model, tr.get_method("visual_random", keep_ratio=0.5, seed=5)) as h:
            got = model(**inputs).logits[0, -1]
        kept = torch.tensor(h.stats.kept_positions[0])
        out = model.model.language_model(inputs_embeds=embeds[:, kept], position_ids=kept[None],
                                         attention_mask=torch.ones(1, len(kept), dtype=torch.long))
        want = model.lm_head(out.last_hidden_state)[0, -1]
    assert torch.allclose(got, want, atol=1e-5)


def test_renumbered_positions_end_where_the_prompt_ends():
    """renumber=True: the reference's 0..k-1 shifted so the kept tokens end at the caller's last position."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    n = inputs["input_ids"].shape[1]
    seen = {}
    with torch.no_grad(), tr.apply(model, tr.get_method("fastervlm", keep_count=4, renumber=True)) as h:
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.setdefault("p", [])
            .append(kw["position_ids"]), with_kwargs=True)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        hook.remove()
    k = len(h.stats.kept_positions[0])
    assert seen["p"][0][0].tolist() == list(range(n - k, n))  # the prefill
    assert seen["p"][1][0].tolist() == [n]  # the first generated token continues right after


def eager_lm_attentions(name: str, inputs: dict):
    model = tiny_vlm(name, attn="eager")
    with torch.no_grad():
        return model(**inputs, output_attentions=True, output_hidden_states=True), model


@pytest.mark.parametrize("sample", [0, 2])
def test_fastv_keeps_the_visual_tokens_the_last_query_attends_most_at_layer_k_minus_1(sample):
    """Plain reference (paper Sec. 4): the last token's attention at layer K-1, mean over heads, top (1-R) N."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), sample)
    out, _ = eager_lm_attentions("llava", inputs)
    span = image_span(inputs["input_ids"])
    row = out.attentions[0][0, :, -1].mean(0)[span.start:span.stop]  # layer K-1 = 0
    want = (row.topk(math.floor(16 * 0.5)).indices.sort().values + span.start).tolist()
    with torch.no_grad(), tr.apply(model, tr.get_method("fastv", k=1, r=0.5)) as h:
        model(**inputs)
    assert [p for p in h.stats.kept_positions[1][0] if p in span] == want


def test_pyramiddrop_scores_with_layer_k_projections_and_gqa():
    """Plain reference (pdrop_rank_drop, GQA fixed): layer K's norm, q/k projections and RoPE on its input, the
    last token's softmax over all keys (each query head with its KV head), mean over heads, top lambda N visual."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 1)
    out, _ = eager_lm_attentions("llava", inputs)
    layer = model.model.language_model.layers[1]
    x = layer.input_layernorm(out.hidden_states[1])  # hidden_states[1]: layer 1's input
    a = layer.self_attn
    n, hd = x.shape[1], 16
    q = a.q_proj(x).view(1, n, 4, hd).transpose(1, 2)
    k = a.k_proj(x).view(1, n, 2, hd).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(x, torch.arange(n)[None])
    q, k = tf.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(2, dim=1)
    row = ((q[:, :, -1:] @ k.transpose(-1, -2)) / hd ** 0.5).softmax(-1)[0, :, 0].mean(0)
    span = image_span(inputs["input_ids"])
    want = (row[span.start:span.stop].topk(8).indices.sort().values + span.start).tolist()
    with torch.no_grad(), tr.apply(model, tr.get_method("pyramiddrop", layers=[1, 2], lambda_=0.5)) as h:
        model(**inputs)
    assert [p for p in h.stats.kept_positions[1][0] if p in span] == want
    assert h.stats.visual_tokens_per_layer == [16, 8, 4]


def test_tome_in_the_tower_fastervlm_at_the_connector_snapkv_in_the_cache_compose():
    model = tiny_vlm("llava_dinov2")
    batch = vlm_batch(model, "llava_dinov2", TEXTS)
    methods = (tr.get_method("tome", keep_ratio=0.6), tr.get_method("fastervlm", keep_ratio=0.5),
               tr.get_method("snapkv", keep_ratio=0.5, window_size=2))
    with torch.no_grad(), tr.apply(model, *methods) as h:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        stages = h.stats_by_stage
        singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False)[0, -4:] for i in range(3)]
    assert set(stages) == {"encoder", "connector", "kv-cache"}
    assert stages["connector"].kept_visual_tokens < 16 // 2 + 1
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s)


# ---------------------------------------------------------------------------- errors a user meets first
def test_a_visual_method_on_a_text_only_model_says_what_is_wrong():
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT)).eval()
    for name in ("fastervlm", "fastv"):
        with pytest.raises(tr.UnsupportedModelError, match="not a vision-language model"):
            tr.patch(lm, tr.get_method(name, keep_ratio=0.5))


def test_a_prompt_without_visual_tokens_is_a_counted_no_op():
    model = tiny_vlm("llava")
    ids = torch.randint(2, 100, (1, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for method in (tr.get_method("visual_random", keep_ratio=0.5), tr.get_method("fastv", k=1, r=0.5)):
            with tr.apply(model, method) as h:
                got = model(input_ids=ids).logits
            assert torch.equal(got, want)
            assert next(iter(h.stats_by_stage.values())).no_visual_forwards == 1


def test_a_budget_that_leaves_no_visual_token_is_refused_before_the_tower_runs():
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    ran = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: ran.append(1))
    with pytest.raises(tr.BudgetError, match="less than 1"), tr.apply(model, tr.get_method("fastervlm", keep_ratio=0.05)):
        model(**inputs)
    hook.remove()
    assert not ran
    with pytest.raises(tr.BudgetError, match="larger than"), tr.apply(model, tr.get_method("visual_random", keep_count=17)):
        model(**inputs)


def test_a_drop_layer_beyond_the_language_model_is_refused_at_attach():
    model = tiny_vlm("llava")
    with pytest.raises(tr.BudgetError, match="beyond"):
        tr.patch(model, tr.get_method("fastv", k=3, r=0.5))
    with pytest.raises(tr.BudgetError, match="lowest reachable"):
        tr.patch(model, tr.get_method("fastv", k=2, keep_ratio=0.5))


def test_cls_methods_on_a_tower_without_cls_name_the_ones_that_work():
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   image_size=32, patch_size=8)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="full", vision_feature_layer=-2)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    with pytest.raises(tr.UnsupportedModelError, match="visual_random, visual_pool"):
        tr.patch(model, tr.get_method("fastervlm", keep_ratio=0.5))
    tr.patch(model, tr.get_method("visual_pool", keep_ratio=0.25)).remove()


def test_an_unsupported_vlm_family_names_the_supported_ones():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tf.LlavaConfig(text_config=tf.LlamaConfig(**TEXT))
            self.lm = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT))

    with pytest.raises(tr.UnsupportedModelError, match="unsupported family.*Qwen2-VL"):
        tr.patch(Other(), tr.get_method("visual_random", keep_ratio=0.5))


# ---------------------------------------------------------------------------- every VLM family
FAMILIES = ["llava", "llava_dinov2", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3",
            "smolvlm", "gemma3"]


def family_methods(name: str):
    mrope = name.startswith("qwen")
    own = "previous" if mrope else "own"
    return [("visual_random", {}), ("fastv", dict(k=1)), ("pyramiddrop", dict(layers=[1, 2], scores_from=own)),
            ("llavolta", dict(layer=1)), ("visiondrop", dict(layers=[1, 2], scores_from=own)),
            # one image per prompt: a coarse view + one tile (grid=1), or LLaVA-NeXT's own base view + crops
            ("coarse_to_fine", dict(k=1, grid=None if name == "llava_next" else 1, scores_from=own)),
            ("sparsevlm", dict(layers=[1, 2])), ("sparsevlm", dict(layers=[1, 2], version="v2")),
            ("flowcut_llm", dict(layer=1)), ("yopo", {})]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_keep_ratio_one_is_bit_identical_and_a_padded_batch_is_its_samples(name):
    """Visual spans found from the ids (image newlines, begin/end tokens, M-RoPE positions, Gemma 3's mask dict,
    Qwen3-VL's deepstack features): at keep_ratio=1.0 the logits are the model's bit for bit, and a left-padded batch
    of three prompts of different lengths generates what each prompt generates alone."""
    model = tiny_vlm(name)
    batch = vlm_batch(model, name, TEXTS)
    with torch.no_grad():
        want = model(**batch).logits
        for method, kw in family_methods(name):
            with tr.apply(model, tr.get_method(method, keep_ratio=1.0, **kw)):
                assert torch.equal(model(**batch).logits, want), method
            with tr.apply(model, tr.get_method(method, keep_ratio=0.6, **kw)) as h:
                out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
                s = next(iter(h.stats_by_stage.values()))
                singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                           for i in range(len(TEXTS))]
            kept = s.kept_visual_tokens if hasattr(s, "kept_visual_tokens") else s.visual_tokens_per_layer[-1]
            assert kept < s.visual_tokens, method
            for i, single in enumerate(singles):
                assert torch.equal(out[i], single), (method, i)


@pytest.mark.parametrize("name", FAMILIES)
def test_tower_methods_run_where_the_projector_reads_the_tower_and_are_refused_before_any_work_elsewhere(name):
    """FlowCut and ToMe in the vision tower: in the LLaVA family keep_ratio=1.0 is bit-identical and a padded batch
    generates what each prompt generates alone; every family whose projector reshapes the patch grid after the tower
    (or whose tower is no supported encoder) refuses at attach with `UnsupportedModelError`, never a tensor error."""
    from tokenreduce.families.vlms import find_vlm

    model = tiny_vlm(name)
    batch = vlm_batch(model, name, TEXTS)
    for method in ("flowcut", "tome"):
        if not find_vlm(model).family.tower_reduction:
            with pytest.raises(tr.UnsupportedModelError):
                tr.patch(model, tr.get_method(method, keep_ratio=0.6))
            continue
        with torch.no_grad():
            want = model(**batch).logits
            with tr.apply(model, tr.get_method(method, keep_ratio=1.0)):
                assert torch.equal(model(**batch).logits, want), method
            with tr.apply(model, tr.get_method(method, keep_ratio=0.6)) as h:
                out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
                s = h.stats_by_stage["connector"]
                singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                           for i in range(len(TEXTS))]
        assert s.kept_visual_tokens < s.visual_tokens, method
        for i, single in enumerate(singles):
            assert torch.equal(out[i], single), (method, i)


def test_pyramiddrop_own_scores_refuse_m_rope_with_the_fix():
    with pytest.raises(tr.UnsupportedModelError, match="scores_from='previous'"):
        tr.patch(tiny_vlm("qwen2_vl"), tr.get_method("pyramiddrop", layers=[1, 2], keep_ratio=0.6))
