"""DyMU's virtual token unmerging (dymu_vtu) against a plain reference written from the paper.

The reference (``ref_layer``) runs one decoder layer by hand: the merged rows repeated at every prompt position
they stand for (each patch's merged token at that patch's place), RoPE at the original positions, the layer's own
attention module over the whole expanded prompt (causal, padding masked), each merged row's attention output the
mean of its copies', then the residual and the MLP on the merged rows. The row map is derived here from the
tower's source map (`Handle.source`: patches sharing an output token form a group, placed at its earliest patch)
and the prompt positions the language model kept, independently of the runtime's own map.

Equality that holds: every layer of the attached model equals ``ref_layer`` applied to that layer's input (so the
whole stack equals the reference iterated layer by layer, and the cache holds the reference's expanded keys and
values); it is not the full model on the expanded prompt beyond the first attention sublayer (copies of a merged
token would diverge there) — that is the method's approximation.
"""

from __future__ import annotations

import pytest
import torch
from tiny_vlm import IMAGE_ID, one, tiny_vlm, vlm_batch
from transformers import DynamicCache

import tokenreduce as tr

TEXTS = [(3, 5), (1, 2), (4, 7)]


def calibrated(model, keep_ratio=0.6, **kw):
    m = tr.get_method("dymu_vtu", keep_ratio=keep_ratio, **kw)
    tr.calibrate(m, model, [vlm_batch(model, "llava", TEXTS, seed=s) for s in range(20, 23)])
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_vlm("llava")


@pytest.fixture(scope="module")
def method(model):
    return calibrated(model)


def greedy(model, inputs, new=4):
    return model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=0)[:, -new:]


# ---------------------------------------------------------------------------- the plain reference
def row_map(ids: torch.Tensor, source, kept_positions) -> torch.Tensor:
    """[B, L]: the merged row each prompt position's token is in (-1: padding), from the tower's source map."""
    b, n = ids.shape
    width = max(len(k) for k in kept_positions)
    origin = torch.full((b, n), -1, dtype=torch.long)
    dest = source.dest  # [I, 1 + patches]: [CLS] then the patches -> output token
    for s in range(b):
        rows = {p: width - len(kept_positions[s]) + r for r, p in enumerate(kept_positions[s])}
        start = int((ids[s] == IMAGE_ID).nonzero()[0])
        patches = dest[s, 1:].tolist()
        for p, d in enumerate(patches):
            anchor = min(q for q, e in enumerate(patches) if e == d)  # the group's earliest patch holds its row
            origin[s, start + p] = rows[start + anchor]
        for pos, r in rows.items():
            if not start <= pos < start + len(patches):
                origin[s, pos] = r
    return origin


def ref_layer(layer, lm, h_in, origin, valid, positions):
    """One decoder layer, VTU by hand: (layer output [B, M, C], expanded rotated keys, values [B, H_kv, L, D])."""
    b, n = origin.shape
    x = h_in[torch.arange(b)[:, None], origin.clamp_min(0)]  # every merged row at each of its positions
    cos, sin = lm.rotary_emb(x, position_ids=positions)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool)[None]
    cache = DynamicCache(config=lm.config)  # the layer's keys and values after RoPE, as a cache stores them
    attn = layer.self_attn
    with torch.no_grad():
        out, _ = attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                      attention_mask=mask[:, None], past_key_values=cache)
    keys, values = cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values
    rows = h_in.shape[1]
    mean = torch.zeros(b, rows, out.shape[-1])
    count = torch.zeros(b, rows, 1)
    for s in range(b):
        for p in range(n):
            if origin[s, p] >= 0:
                mean[s, origin[s, p]] += out[s, p]
                count[s, origin[s, p]] += 1
    h1 = h_in + mean / count.clamp_min(1)
    return h1 + layer.mlp(layer.post_attention_layernorm(h1)), keys, values


def run_captured(model, method, batch):
    """Under the method: each layer's (input, output), the prefill's cache and the call the language model got."""
    lm = model.model.language_model
    seen, call = {}, {}

    def before_lm(module, args, kwargs):  # registered before apply: the caller's original call
        call.update(kwargs)

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            seen[i] = (kwargs.get("hidden_states", args[0] if args else None), output)
        return hook

    pre = lm.register_forward_pre_hook(before_lm, with_kwargs=True)
    try:
        with torch.no_grad(), tr.apply(model, method) as h:
            hooks = [layer.register_forward_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
            cache = DynamicCache(config=lm.config)
            logits = model(**batch, past_key_values=cache).logits
            for x in hooks:
                x.remove()
            stats, source = h.stats_by_stage["decoder"], h.source
    finally:
        pre.remove()
    return seen, cache, call, stats, source, logits


def test_every_layer_equals_the_plain_reference_and_the_cache_holds_the_whole_prompt(model, method):
    batch = vlm_batch(model, "llava", TEXTS, seed=5)
    seen, cache, call, stats, source, _ = run_captured(model, method, batch)
    assert stats.unmerged_forwards == 1 and stats.kept_visual_tokens < stats.visual_tokens == 16
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    b, n = ids.shape
    origin = row_map(ids, source, stats.kept_positions)
    pos = call.get("position_ids")
    pos = torch.arange(n)[None].expand(b, -1) if pos is None else pos
    lm = model.model.language_model
    assert len(seen) == len(lm.layers)
    for i, layer in enumerate(lm.layers):
        h_in, h_out = seen[i]
        assert h_in.shape[1] < n  # linear layers and MLPs run on the merged rows
        want, keys, values = ref_layer(layer, lm, h_in, origin, valid, pos)
        real = torch.zeros(h_in.shape[:2], dtype=torch.bool)
        real.scatter_(1, origin.clamp_min(0), origin >= 0)
        torch.testing.assert_close(h_out[real], want[real], atol=1e-5, rtol=1e-5)
        layer_cache = cache.layers[i]
        assert layer_cache.keys.shape[-2] == n  # the whole prompt, as the reference's cache
        torch.testing.assert_close(layer_cache.keys.transpose(1, 2)[valid], keys.transpose(1, 2)[valid],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer_cache.values.transpose(1, 2)[valid], values.transpose(1, 2)[valid],
                                   atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == n


def test_vtu_changes_what_dtome_alone_gives_and_composes_from_a_tower_method(model, method):
    batch = vlm_batch(model, "llava", TEXTS, seed=6)
    with torch.no_grad():
        with tr.apply(model, method) as h:
            whole = model(**batch).logits
            flops = h.stats.flops
        tower = method.tower
        with tr.apply(model, tower) as h:
            alone = model(**batch).logits
            flops_alone = h.stats.flops
        with tr.apply(model, tower, tr.get_method("dymu_vtu", tower=False)):
            composed = model(**batch).logits
    assert torch.equal(composed, whole)  # the pipeline method = DToMe + VTU given apart
    assert alone.shape == whole.shape and not torch.allclose(alone, whole, atol=1e-3)
    assert flops > flops_alone  # attention over the whole prompt costs more than over the merged rows


def test_nothing_merged_is_the_model_bit_for_bit(model, method):
    batch = vlm_batch(model, "llava", TEXTS, seed=7)
    with torch.no_grad():
        ref, ref_tokens = model(**batch).logits, greedy(model, batch)
        with tr.apply(model, tr.get_method("dymu_vtu", keep_ratio=1.0)):
            out, tokens = model(**batch).logits, greedy(model, batch)
        assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)
        # calibrated thresholds that merge nothing: the tower and VTU run and change nothing DToMe alone gives
        never = tr.get_method("dymu_vtu", keep_ratio=0.6).load_state_dict({"thresholds": [1.0]})
        with tr.apply(model, never.tower):
            alone = model(**batch).logits
        with tr.apply(model, never) as h:
            out = model(**batch).logits
            assert h.stats_by_stage["decoder"].unmerged_forwards == 0
    assert torch.equal(out, alone)


def test_a_left_padded_batch_is_its_samples_under_generate(model, method):
    batch = vlm_batch(model, "llava", TEXTS, seed=8)
    with torch.no_grad(), tr.apply(model, method) as h:
        logits = model(**batch).logits
        visual = h.stats_by_stage["decoder"]
        out = greedy(model, batch, new=5)
        singles = [greedy(model, one(batch, i), new=5)[0] for i in range(len(TEXTS))]
        single_logits = [model(**one(batch, i)).logits[0, -1] for i in range(len(TEXTS))]
    assert visual.kept_visual_tokens < visual.visual_tokens
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), (i, out[i].tolist(), s.tolist())
        torch.testing.assert_close(logits[i, -1], single_logits[i], atol=1e-5, rtol=1e-5)


# tower methods run in CLIP / DINOv2 towers (the LLaVA families); eager attention takes an additive mask
@pytest.mark.parametrize("name,attn", [("llava_dinov2", "sdpa"), ("llava", "eager")])
def test_other_families_and_eager_attention_batch_equals_samples(name, attn):
    model = tiny_vlm(name, attn=attn)
    m = tr.get_method("dymu_vtu", keep_ratio=0.6)
    tr.calibrate(m, model, [vlm_batch(model, name, TEXTS, seed=s) for s in range(20, 23)])
    batch = vlm_batch(model, name, TEXTS, seed=9)
    with torch.no_grad(), tr.apply(model, m) as h:
        out = greedy(model, batch)
        s = h.stats_by_stage["decoder"]
        singles = [greedy(model, one(batch, i))[0] for i in range(len(TEXTS))]
    assert s.kept_visual_tokens < s.visual_tokens
    for i, single in enumerate(singles):
        assert torch.equal(out[i], single), (name, attn, i)


def test_clear_errors(model, method):
    with pytest.raises(tr.ParameterError, match="tower=False"):
        tr.get_method("dymu_vtu", tower=False, keep_ratio=0.5)
    with pytest.raises(tr.BudgetError, match="dymu_vtu needs exactly one"):
        tr.get_method("dymu_vtu")
    with pytest.raises(tr.CalibrationError, match="calibrate"):
        with torch.no_grad(), tr.apply(model, tr.get_method("dymu_vtu", keep_ratio=0.6)):
            model(**vlm_batch(model, "llava", TEXTS))
    with pytest.raises(tr.UnsupportedModelError, match="1-D RoPE"):
        tr.patch(tiny_vlm("qwen2_vl"), tr.get_method("dymu_vtu", tower=False))
    with pytest.raises(tr.StageError, match="whole prompt's cache"):
        tr.patch(model, method, tr.get_method("snapkv", keep_ratio=0.5))
    with pytest.raises(tr.StageError, match="dropped some"):  # a pruning connector method: nothing to unmerge
        with torch.no_grad(), tr.apply(model, method.tower, tr.get_method("fastervlm", keep_ratio=0.5),
                                       tr.get_method("dymu_vtu", tower=False)):
            model(**vlm_batch(model, "llava", TEXTS))
