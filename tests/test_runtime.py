"""The runtime: composition across and within stages, per-stage stats, handle lifecycle, never-fired rules.

Each test named after an observation of the outside probe of main at 24e559e (issue 7).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import tokenreduce as tr
from conftest import main_output, pixels, tiny
from tiny_lm import VOCAB, left_pad, prompt, tiny_lm

ENCODER = ["tome", "evit", "mctf", "dymu", "token_transforming", "random", "pool"]


def enc(name: str, **kw):
    kw.setdefault("keep_ratio", 0.5)
    if name == "random":
        kw.setdefault("seed", 0)
    return tr.get_method(name, **kw)


def _dymu_ready(m, model):
    if m.name == "dymu":
        tr.calibrate(m, model, [pixels(2, seed=1)])
    return m


# ---------------------------------------------------------------------------- encoder composition
@pytest.mark.parametrize("first,second", list(itertools.permutations(ENCODER, 2)))
def test_two_encoder_methods_run_in_order_or_are_refused_with_the_rule(first, second):
    """Observed: 6 of 16 ordered pairs crashed with raw index errors (e.g. tome then evit)."""
    model = tiny("vit")
    x = pixels(2)
    a, b = _dymu_ready(enc(first), model), _dymu_ready(enc(second), model)
    if "mctf" in (first, second):
        with pytest.raises(tr.StageError, match="only encoder method"):
            tr.apply(model, a, b).__enter__()
        return
    try:
        with torch.no_grad(), tr.apply(model, a, b) as h:
            out = main_output(model(pixel_values=x))
    except tr.StageError as e:  # only the documented grid rule may refuse, and it names the rule
        assert second == "pool" or first == "pool", e
        assert "rule: a grid method reduces before every other encoder method" in str(e)
        return
    assert torch.isfinite(out).all()
    alone = []
    for m in (enc(first), enc(second)):
        with torch.no_grad(), tr.apply(model, _dymu_ready(m, model)) as h1:
            model(pixel_values=x)
        alone.append(h1.stats.flops_ratio)
    assert h.stats.flops_ratio < min(alone) + 1e-9  # two reductions cut at least as much as either alone


def test_tome_then_evit_equals_a_plain_two_step_reference():
    """ToMe merges at a block, then EViT prunes with the [CLS] attention carried through ToMe's merge."""
    model = tiny("vit")
    x = pixels(2)
    tome, evit = tr.get_method("tome", r=2), tr.get_method("evit", keep_rate=0.7, locations=[1])
    with torch.no_grad(), tr.apply(model, tome, evit, track_source=True) as h:
        model(pixel_values=x)
    counts = [round(c) for c in h.stats.mlp_tokens_per_layer]
    n0 = round(h.stats.tokens_per_layer[0])
    # block 0: ToMe -2; block 1: ToMe -2 then EViT keeps ceil(0.7 * patches) + 1 fused token
    after_tome = n0 - 4
    kept = -(-7 * (after_tome - 1) // 10)
    assert counts[0] == n0 - 2 and counts[1] == 1 + kept + 1
    covers = h.source.covers()  # every input patch is covered by at most one output token
    assert bool((covers.sum(1) <= 1).all()) and covers.shape[1] == counts[-1]


def test_same_method_object_twice_is_refused():
    m = tr.get_method("tome", keep_ratio=0.5)
    with pytest.raises(tr.StageError, match="passed twice"):
        tr.patch(tiny("vit"), m, m)


def test_pool_listed_first_at_block_zero_composes():
    """Observed: pool refused to combine even when listed first. At block 0 and first, it now runs."""
    model = tiny("vit")
    with torch.no_grad(), tr.apply(model, tr.get_method("pool", kernel=2, layer=0), tr.get_method("tome", r=1)) as h:
        model(pixel_values=pixels(1))
    assert h.stats.mlp_tokens_per_layer[0] < h.stats.tokens_per_layer[0]


# ---------------------------------------------------------------------------- a tiny LLaVA: tower + language model
def tiny_llava(seed: int = 0):
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB - 1,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    return model


def llava_inputs(model, n_text: int = 6):
    n_img = (32 // 8) ** 2 + 1  # "full": [CLS] and 16 patches
    ids = torch.cat([prompt(3, seed=2), torch.full((1, n_img), VOCAB - 1), prompt(n_text, seed=3)], dim=1)
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                attention_mask=torch.ones_like(ids))


def test_tome_in_a_llava_tower_survives_generate_at_keep_ratio_one():
    """Observed: generate raised NeverFiredError at the first decoding step (the tower does not run then)."""
    model = tiny_llava()
    inputs = llava_inputs(model)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with tr.apply(model, tr.get_method("tome", keep_ratio=1.0)):
            got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_reducing_inside_a_vlm_tower_hands_the_language_model_fewer_tokens():
    """Observed: transformers raised "Image features and image tokens do not match". The tower reduces before its
    select layer and the connector stage drops the slots the merged tokens left, so generate runs."""
    model = tiny_llava()
    inputs = llava_inputs(model)
    with torch.no_grad(), tr.apply(model, tr.get_method("tome", r=2)) as h:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        s = h.stats_by_stage["connector"]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert s.visual_tokens == 17 and s.kept_visual_tokens == 17 - 2  # [CLS] + 16 patches; r=2 at block 0


class _TowerAndLM(torch.nn.Module):
    """Two models side by side in one forward (a retrieval pipeline, say): a ViT and a causal LM."""

    def __init__(self):
        super().__init__()
        self.vit, self.lm = tiny("vit"), tiny_lm("llama")

    def forward(self, pixel_values, input_ids, past_key_values=None):
        return self.vit(pixel_values=pixel_values), self.lm(input_ids, past_key_values=past_key_values)


def test_encoder_and_kv_methods_report_stats_by_stage():
    """Observed: with an encoder and a kv-cache method attached, h.stats showed only the first attachment."""
    model = _TowerAndLM().eval()
    with torch.no_grad(), tr.apply(model, tr.get_method("tome", r=1), tr.get_method("snapkv", keep_ratio=0.5)) as h:
        model(pixels(1), prompt(20), past_key_values=DynamicCache())
    by = h.stats_by_stage
    assert set(by) == {"encoder", "kv-cache"}
    assert by["encoder"].flops_ratio < 1.0 and by["encoder"].tokens_per_layer
    assert by["kv-cache"].kv_bytes_ratio == pytest.approx(0.5)
    s = h.stats
    assert s.flops == pytest.approx(by["encoder"].flops + by["kv-cache"].flops)
    assert s.kv_bytes_after == by["kv-cache"].kv_bytes_after and s.tokens_per_layer == by["encoder"].tokens_per_layer
    # in a LLaVA: the tower at keep_ratio 1.0 and the kv stage, both reported
    llava = tiny_llava()
    with torch.no_grad(), tr.apply(llava, tr.get_method("tome", keep_ratio=1.0), tr.get_method("snapkv", keep_ratio=0.5)) as h:
        llava.generate(**llava_inputs(llava), max_new_tokens=3, do_sample=False)
    assert set(h.stats_by_stage) == {"encoder", "kv-cache"} and h.stats.kv_bytes_ratio < 0.6


class _SkipsItsEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vit, self.head = tiny("vit"), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(x)


def test_never_fired_when_an_encoder_model_runs_without_its_encoder():
    """An encoder-only model (no cache argument) whose forward skips the tower still raises."""
    model = _SkipsItsEncoder()
    with tr.apply(model, tr.get_method("tome", r=1)), pytest.raises(tr.NeverFiredError, match="encoder blocks did not"):
        model(torch.zeros(1, 4))


# ---------------------------------------------------------------------------- decoder side
def test_gemfilter_then_snapkv_filters_then_compresses():
    """Observed: GemFilter could not be combined with a kv-cache method."""
    model = tiny_lm("llama", layers=3)
    ids = prompt(40)
    gem = tr.get_method("gemfilter", keep_count=16, layer=1)
    with torch.no_grad():
        with tr.apply(model, gem) as h_gem:
            alone = model.generate(ids, max_new_tokens=5, do_sample=False)
        cache = DynamicCache()
        with tr.apply(model, tr.get_method("gemfilter", keep_count=16, layer=1),
                      tr.get_method("snapkv", keep_count=8, window_size=4)) as h:
            both = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
    by = h.stats_by_stage
    assert set(by) == {"decoder", "kv-cache"}
    assert by["decoder"].kept_tokens == 16 and by["kv-cache"].kv_kept_per_layer == [8.0] * 3
    assert h.stats.kv_bytes_before == h_gem.stats.kv_bytes_before  # the whole prompt's cache
    assert h.stats.kv_bytes_ratio == pytest.approx(8 / 40)
    layer = cache.layers[0]
    assert layer.compressed_length == 40 and layer.compressed_slots == 8
    assert set(layer.kept.flatten().tolist()) <= set(h_gem.attachments["decoder"].kept.flatten().tolist())
    assert both.shape == alone.shape and torch.equal(both[:, :40], ids)


def test_gemfilter_then_kv_method_batch_equals_one_at_a_time():
    model = tiny_lm("llama", layers=3)
    prompts = [prompt(40, seed=1)[0], prompt(29, seed=2)[0]]
    ids, mask = left_pad(prompts)

    def run(i, m):
        return model.generate(i, attention_mask=m, max_new_tokens=4, do_sample=False)

    methods = lambda: (tr.get_method("gemfilter", keep_ratio=0.5, layer=1), tr.get_method("h2o", keep_ratio=0.5))
    with torch.no_grad():
        with tr.apply(model, *methods()):
            batch = run(ids, mask)
        for b, p in enumerate(prompts):
            with tr.apply(model, *methods()):
                one = run(p[None], torch.ones(1, len(p), dtype=torch.long))
            assert torch.equal(batch[b, -4:], one[0, -4:])


def test_decode_time_eviction_holds_the_budget_on_a_one_token_prompt():
    """Observed: h2o(keep_count=4) left 20 entries after a 1-token prompt, kv_decode_steps=0, no error."""
    model = tiny_lm("llama")
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("h2o", keep_count=4)) as h:
        model.generate(prompt(1), max_new_tokens=19, do_sample=False, past_key_values=cache)
    assert all(layer.keys.shape[-2] <= 4 for layer in cache.layers)
    assert h.stats.kv_decode_steps >= 15


def test_decode_time_eviction_refuses_a_cache_filled_outside_apply():
    """Observed: a cache filled outside apply was never evicted, silently."""
    model = tiny_lm("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(prompt(20), past_key_values=cache)
        with tr.apply(model, tr.get_method("h2o", keep_count=4)), pytest.raises(tr.StageError, match="outside"):
            model(prompt(1), past_key_values=cache)
    assert cache.get_seq_length() == 20  # refused before any work: nothing appended


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "kvcrush"])
def test_prefilled_cache_then_a_chunk_shorter_than_the_window(name):
    """Observed: 30 tokens cached outside, then generate on 40 -> RuntimeError: shape '[1, 2, 64, 16]' is invalid."""
    model = tiny_lm("llama")
    ids = prompt(40)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        with tr.apply(model, tr.get_method(name, keep_ratio=0.5)) as h:
            out = model.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert out.shape[1] == 43
    kept = h.stats.kv_kept_per_layer  # PyramidKV: per-layer budgets whose mean is the budget
    assert kept and sum(kept) / len(kept) == 20.0


# ---------------------------------------------------------------------------- handle lifecycle
def test_a_removed_handle_cannot_be_entered_again():
    """Observed: a removed handle used again as `with h:` ran unreduced with empty stats, no error."""
    model = tiny("vit")
    h = tr.patch(model, tr.get_method("tome", r=1))
    h.remove()
    with pytest.raises(tr.StageError, match="was removed"):
        with h:
            pass
    with tr.apply(model, tr.get_method("tome", r=1)) as h2:
        pass
    with pytest.raises(tr.StageError, match="was removed"):
        h2.__enter__()


def test_the_apply_context_enters_once():
    """Observed: entering apply()'s object twice gave AttributeError: '_GeneratorContextManager' ..."""
    model = tiny("vit")
    ctx = tr.apply(model, tr.get_method("tome", r=1))
    with ctx:
        model(pixel_values=pixels(1))
    with pytest.raises(tr.StageError, match="already entered once"):
        with ctx:
            pass
    out = main_output(model(pixel_values=pixels(1)))
    with torch.no_grad():
        assert torch.equal(out, main_output(tiny("vit")(pixel_values=pixels(1))))


def test_routing_listeners_are_removed_in_any_order():
    """Two stages on the same attention module (gemfilter's filter layer and the kv stage) undo in any order."""
    model = tiny_lm("llama", layers=2)
    attn = model.model.layers[1].self_attn
    before = dict(attn.__dict__)
    ha = tr.patch(model, tr.get_method("gemfilter", keep_count=4, layer=1), tr.get_method("snapkv", keep_count=4))
    assert attn.config is not before["config"]
    gem, kv = ha.attachments["decoder"], ha.attachments["kv-cache"]
    gem.remove()
    assert attn.config is not before["config"]  # the kv stage still listens
    kv.remove()
    ha.remove()
    assert attn.__dict__.keys() == before.keys() and attn.config is before["config"]


def test_a_second_handle_on_the_same_decoder_is_refused_with_the_fix():
    """Observed: the nested-apply advice ("pass all methods to one apply()") then crashed; now that call composes."""
    model = tiny_lm("llama", layers=2)
    before = dict(model.model.__dict__)
    with tr.apply(model, tr.get_method("snapkv", keep_ratio=0.5)):
        with pytest.raises(tr.StageError, match="pass all methods to one apply"):
            tr.patch(model, tr.get_method("gemfilter", keep_count=4, layer=1))
    with tr.apply(model, tr.get_method("gemfilter", keep_count=4, layer=1), tr.get_method("snapkv", keep_ratio=0.5)):
        model(prompt(12), past_key_values=DynamicCache())
    assert model.model.__dict__.keys() == before.keys()
