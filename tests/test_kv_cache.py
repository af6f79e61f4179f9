"""KV-cache stage mechanics on tiny random causal LMs: the cache shrinks, positions and masks stay right,
generate works (greedy, sampled, padded batches), the model is restored, bad input gets a clear error."""

import pytest
import torch
import transformers as tf
from tiny_lm import ARCHS, assert_restored, greedy, left_pad, prompt, snapshot, tiny_lm
from transformers import DynamicCache, StaticCache

import tokenreduce as tr
from tokenreduce.core.kv import CompressedLayer

KV_METHODS = {"snapkv": dict(window_size=4), "streaming_llm": {}, "tova": {}, "knorm": {}, "kv_random": {}, "h2o": {}}


def method(name, **budget):
    return tr.get_method(name, **budget, **KV_METHODS[name])


# ---------------------------------------------------------------------------- identity and restore
@pytest.mark.parametrize("arch", ARCHS)
def test_keep_ratio_one_generates_identically_and_restores(arch):
    model, ids = tiny_lm(arch), prompt(24)
    snap = snapshot(model)
    with torch.no_grad():
        ref = greedy(model, ids)
        for name in KV_METHODS:
            with tr.apply(model, method(name, keep_ratio=1.0)) as h:
                out = greedy(model, ids)
            assert torch.equal(out, ref), name
            assert h.stats.flops_ratio == 1.0
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(greedy(model, ids), ref)


def test_keep_everything_decodes_bit_identically():
    """keep_count = whole context: the cache is a CompressedLayer, decoding is the plain model's bit for bit."""
    model, ctx, cont = tiny_lm("llama"), prompt(30), prompt(6, seed=1)
    with torch.no_grad():
        plain = DynamicCache()
        model(ctx, past_key_values=plain)
        ref_q = model(cont, past_key_values=plain).logits  # a multi-token continuation (a question)
        ref_steps = [model(cont[:, i:i + 1], past_key_values=plain).logits for i in range(4)]  # then decoding
        cache = DynamicCache()
        with tr.apply(model, tr.get_method("snapkv", keep_count=30, window_size=4)):
            model(ctx, past_key_values=cache)
            assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
            out_q = model(cont, past_key_values=cache).logits
            out_steps = [model(cont[:, i:i + 1], past_key_values=cache).logits for i in range(4)]
    assert torch.equal(out_q, ref_q)
    assert all(torch.equal(a, b) for a, b in zip(out_steps, ref_steps))


def test_restore_after_exception():
    model, ids = tiny_lm("qwen2"), prompt(20)
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with tr.apply(model, tr.get_method("snapkv", keep_ratio=0.5, window_size=4)):
                model(ids)
                raise RuntimeError("boom")
        assert_restored(model, snap)
        assert torch.equal(model(ids).logits, ref)
        h = tr.patch(model, tr.get_method("tova", keep_ratio=0.5))
        h.remove()
        h.remove()  # idempotent
    assert_restored(model, snap)


# ---------------------------------------------------------------------------- the cache really shrinks
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(KV_METHODS))
def test_cache_shrinks_physically(arch, name):
    model, ids = tiny_lm(arch), prompt(40)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, method(name, keep_ratio=0.25)) as h:
        model(ids, past_key_values=cache)
    info = model.config
    head_dim = getattr(info, "head_dim", None) or info.hidden_size // info.num_attention_heads
    for layer in cache.layers:
        assert isinstance(layer, CompressedLayer)
        assert layer.keys.shape == layer.values.shape == (1, 2, 10, head_dim)
        assert layer.get_seq_length() == 40  # logical: new tokens continue at position 40
        assert layer.get_mask_sizes(1) == (11, 30)
    s = h.stats
    assert s.kv_layers == list(range(len(cache.layers)))
    assert s.kv_kept_per_layer == [10.0] * len(cache.layers) and s.kv_entries_per_layer == [40.0] * len(cache.layers)
    assert s.kv_bytes_before == 4 * s.kv_bytes_after == len(cache.layers) * 2 * 2 * 40 * head_dim * 4
    assert s.kv_bytes_ratio == 0.25
    assert s.flops_ratio == 1.0  # compression happens after prefill


def test_compresses_once_per_prompt_greedy_and_sampled():
    model, ids = tiny_lm("llama"), prompt(24)
    m = tr.get_method("snapkv", keep_ratio=0.5, window_size=4)
    calls = []
    score = m.score
    m.score = lambda ctx: calls.append(ctx.layer) or score(ctx)
    with torch.no_grad(), tr.apply(model, m):
        greedy(model, ids, new=6)
        assert calls == [0, 1]  # each layer once, at the prefill; never on decoding steps
        torch.manual_seed(3)
        a = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
        torch.manual_seed(3)
        b = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    assert calls == [0, 1] * 3
    assert torch.equal(a, b) and a.shape == (1, 30)


# ---------------------------------------------------------------------------- positions after eviction
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_positions_and_eviction_match_a_masked_full_model(arch):
    """StreamingLLM keeps sinks + recent; the continuation must equal the full model whose later rows
    cannot see the evicted entries (same rotary positions for everything)."""
    model = tiny_lm(arch, dtype=torch.float64)
    n, sinks, keep, c = 32, 4, 12, 5
    ctx, cont = prompt(n), prompt(c, seed=1)
    kept = list(range(sinks)) + list(range(n - (keep - sinks), n))
    allowed = torch.ones(n + c, n + c, dtype=torch.bool).tril()
    evicted = [j for j in range(n) if j not in kept]
    allowed[n:, evicted] = False
    with torch.no_grad():
        ref = model(torch.cat([ctx, cont], 1), attention_mask=allowed[None, None]).logits[:, n:]
        for steps in (False, True):
            cache = DynamicCache()
            with tr.apply(model, tr.get_method("streaming_llm", keep_count=keep, n_sink=sinks)):
                model(ctx, past_key_values=cache)
            assert all(layer.kept[0, h].tolist() == kept for layer in cache.layers for h in range(2))
            if steps:  # decoding token by token, plain model after exit
                out = torch.cat([model(cont[:, i:i + 1], past_key_values=cache).logits for i in range(c)], 1)
            else:  # the continuation in one forward
                out = model(cont, past_key_values=cache).logits
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- batches with left padding
LENGTHS = [30, 17, 41, 9]


@pytest.mark.parametrize("name", list(KV_METHODS))
def test_padded_batch_generates_as_one_at_a_time(name):
    model = tiny_lm("llama")
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, method(name, keep_ratio=0.5)) as h:
        out = greedy(model, ids, mask, past_key_values=cache)
        assert h.stats.kv_kept_per_layer[0] == sum(n // 2 for n in LENGTHS) / 4
        assert h.stats.kv_slots_per_layer[0] == max(LENGTHS) // 2  # padded slots are reported in the bytes
        singles, kept = [], []
        for p in prompts:
            single = DynamicCache()
            singles.append(greedy(model, p[None], past_key_values=single)[0])
            kept.append(single.layers[1].kept[0])
    with torch.no_grad():
        plain = greedy(model, ids, mask)
    for i, n in enumerate(LENGTHS):
        assert torch.equal(out[i], singles[i]), i
        # the same entries, in the sample's own coordinates (the batch is left-padded)
        row = cache.layers[1].kept[i]
        pad = ids.shape[1] - n
        assert torch.equal(row[:, row.shape[1] - n // 2:] - pad, kept[i])
        assert (row[:, : row.shape[1] - n // 2] == -1).all()
    assert cache.layers[1].slot_valid.sum(1).tolist() == [n // 2 for n in LENGTHS]
    assert not torch.equal(plain, out)  # the test can tell compression from none


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "phi3"])
def test_padded_batch_other_families_and_eager(arch):
    for attn in ("sdpa", "eager"):
        model = tiny_lm(arch, attn=attn)
        prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
        ids, mask = left_pad(prompts)
        with torch.no_grad(), tr.apply(model, tr.get_method("snapkv", keep_ratio=0.4, window_size=4)):
            out = greedy(model, ids, mask)
            singles = [greedy(model, p[None])[0] for p in prompts]
        assert all(torch.equal(out[i], singles[i]) for i in range(4)), attn


def test_sliding_window_layers_are_left_alone():
    """Qwen2 with sliding layers (1, 2) and a full layer (0): only the full layer is compressed; a padded batch
    still generates as one at a time."""
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, pad_token_id=0, eos_token_id=None,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg._attn_implementation = "sdpa"
    model = tf.Qwen2ForCausalLM(cfg).eval()
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    with torch.no_grad(), tr.apply(model, tr.get_method("snapkv", keep_ratio=0.5, window_size=4)) as h:
        cache = DynamicCache(config=model.config)
        out = greedy(model, ids, mask, past_key_values=cache)
        assert h.stats.kv_layers == [0]
        singles = [greedy(model, p[None])[0] for p in prompts]
    assert [type(layer).__name__ for layer in cache.layers] == ["CompressedLayer"] + ["DynamicSlidingWindowLayer"] * 2
    assert all(torch.equal(out[i], singles[i]) for i in range(4))


def test_beam_search_on_a_padded_batch():
    model = tiny_lm("mistral")
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate([30, 17])]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), tr.apply(model, tr.get_method("tova", keep_ratio=0.5)):
        out = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        singles = [model.generate(p[None], **kw)[0, len(p):] for p in prompts]
    assert all(torch.equal(out[i], singles[i]) for i in range(2))


# ---------------------------------------------------------------------------- the cache after the context exits
def test_cache_stays_compressed_and_usable_after_exit():
    model, ctx, question = tiny_lm("llama"), prompt(40), prompt(5, seed=2)
    full = torch.cat([ctx, question], 1)
    with torch.no_grad():
        inside = DynamicCache()
        with tr.apply(model, tr.get_method("snapkv", keep_ratio=0.5, window_size=8)):
            model(ctx, past_key_values=inside)
            ref = greedy(model, full, past_key_values=inside)  # question-agnostic: context compressed first
        outside = DynamicCache()
        with tr.apply(model, tr.get_method("snapkv", keep_ratio=0.5, window_size=8)):
            model(ctx, past_key_values=outside)
        assert [layer.keys.shape[-2] for layer in outside.layers] == [20, 20]
        out = greedy(model, full, past_key_values=outside)  # plain model, compressed cache
    assert torch.equal(out, ref)
    for layer in outside.layers:
        assert isinstance(layer, CompressedLayer)
        assert layer.keys.shape[-2] == 20 + 5 + 7  # kept + question + generated (the last token is not cached)
        assert layer.get_seq_length() == 40 + 5 + 7
    assert not torch.equal(out, greedy(model, full))  # compression changed something


def test_padded_cache_after_exit_needs_the_attachment():
    model = tiny_lm("llama")
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    cont = prompt(1, seed=9, batch=4)
    m = tr.get_method("tova", keep_ratio=0.5)
    with torch.no_grad():
        cache = DynamicCache()
        with tr.apply(model, m):
            model(ids, attention_mask=mask, past_key_values=cache)
        before = [layer.keys.clone() for layer in cache.layers]
        step_mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
        with pytest.raises(tr.StageError, match="Continue decoding inside"):
            model(cont, attention_mask=step_mask, past_key_values=cache)
        assert all(torch.equal(a, layer.keys) for a, layer in zip(before, cache.layers))  # nothing was lost
        with tr.apply(model, m):  # re-entering masks every layer and does not compress again
            out = model(cont, attention_mask=step_mask, past_key_values=cache).logits
        assert cache.layers[0].keys.shape[-2] == before[0].shape[-2] + 1
        for i, p in enumerate(prompts):
            single = DynamicCache()
            with tr.apply(model, m):
                model(p[None], past_key_values=single)
            ref = model(cont[i:i + 1], past_key_values=single).logits
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_layers_of_different_lengths_mask_themselves():
    """knorm with skip_layers: layer 0 stays whole, layers 1-2 shrink; decoding masks each layer itself,
    and the plain model refuses such a cache before touching it."""
    model, ids = tiny_lm("llama", layers=3), prompt(30)
    m = tr.get_method("knorm", keep_ratio=0.5, skip_layers=[0])
    with torch.no_grad():
        with tr.apply(model, m) as h:
            cache = DynamicCache()
            out = greedy(model, ids, past_key_values=cache, new=5)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [34, 19, 19]
        assert (cache.layers[0].kept == torch.arange(30)).all()  # held, not compressed
        assert h.stats.kv_kept_per_layer == [30.0, 15.0, 15.0] and h.stats.scoring_flops > 0
        # one decoding step on a freshly compressed cache reproduces generate's second token
        ref = DynamicCache()
        with tr.apply(model, m):
            model(ids, past_key_values=ref)
        step = torch.tensor([[out[0, 0]]])
        with tr.apply(model, m):
            logits = model(step, past_key_values=ref).logits
        assert logits[0, -1].argmax() == out[0, 1]
        with pytest.raises(tr.StageError, match="different numbers of entries"):
            model(prompt(2, seed=5), past_key_values=cache)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [34, 19, 19]  # refused before any layer ran


# ---------------------------------------------------------------------------- errors
def test_budget_errors():
    model, ids = tiny_lm("llama"), prompt(20)
    with pytest.raises(tr.BudgetError, match="exactly one budget"):
        tr.get_method("snapkv")
    with pytest.raises(tr.BudgetError, match="exactly one budget"):
        tr.get_method("tova", keep_ratio=0.5, keep_count=3)
    with pytest.raises(tr.BudgetError, match="keep_ratio must be"):
        tr.get_method("knorm", keep_ratio=1.5)
    with pytest.raises(tr.BudgetError, match="integer >= 1"):
        tr.get_method("knorm", keep_count=0)
    with pytest.raises(tr.BudgetError, match="odd"):
        tr.get_method("snapkv", keep_ratio=0.5, kernel_size=4)
    cache = DynamicCache()
    with torch.no_grad():
        with pytest.raises(tr.BudgetError, match="less than 1 of the 20"), tr.apply(model, tr.get_method("tova", keep_ratio=0.04)):
            model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 0  # raised before the first layer wrote to the caller's cache
        with pytest.raises(tr.BudgetError, match="larger than the context"), tr.apply(model, tr.get_method("tova", keep_count=21)):
            model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 0


def test_unsupported_models_and_caches():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).eval()
    with pytest.raises(tr.UnsupportedModelError, match="Llama .*Qwen2, Qwen3, Mistral"):
        tr.apply(gpt2, tr.get_method("snapkv", keep_ratio=0.5)).__enter__()
    cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)  # sliding_window=4096: every layer sliding
    sliding = tf.MistralForCausalLM(cfg).eval()
    with pytest.raises(tr.UnsupportedModelError, match="sliding-window layers alone"):
        tr.patch(sliding, tr.get_method("knorm", keep_ratio=0.5))
    model, ids = tiny_lm("llama"), prompt(16)
    with torch.no_grad(), tr.apply(model, tr.get_method("knorm", keep_ratio=0.5)):
        with pytest.raises(tr.StageError, match="supported: pass past_key_values=DynamicCache"):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32))
        with pytest.raises(tr.StageError, match="use_cache=True"):
            model(ids, use_cache=False)
    with pytest.raises(tr.StageError, match="skip_layers"):
        tr.patch(model, tr.get_method("knorm", keep_ratio=0.5, skip_layers=[7]))
    with pytest.raises(tr.StageError, match="none of the full-attention layers"):
        tr.patch(model, tr.get_method("knorm", keep_ratio=0.5, skip_layers=[0, 1]))
    with pytest.raises(tr.StageError, match="one kv-cache method"):
        tr.patch(model, tr.get_method("knorm", keep_ratio=0.5), tr.get_method("tova", keep_ratio=0.5))
    eager = tiny_lm("llama", attn="flex_attention")
    with pytest.raises(tr.UnsupportedModelError, match="attn_implementation='sdpa'"):
        tr.patch(eager, tr.get_method("tova", keep_ratio=0.5))


def test_gemma3_compresses_its_global_layers_only():
    """Gemma 3's sliding-window layers keep their own bounded cache; the global layers (every 6th) are compressed,
    and a padded batch still generates as one at a time, also with decode-time eviction."""
    model = tiny_lm("gemma3", layers=6)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    for name in ("snapkv", "h2o"):
        with torch.no_grad(), tr.apply(model, method(name, keep_ratio=0.5)) as h:
            cache = DynamicCache(config=model.config)
            out = greedy(model, ids, mask, past_key_values=cache)
            assert h.stats.kv_layers == [5]
            singles = [greedy(model, p[None])[0] for p in prompts]
        kinds = [type(layer).__name__ for layer in cache.layers]
        assert kinds == ["DynamicSlidingWindowLayer"] * 5 + ["CompressedLayer"]
        assert all(torch.equal(out[i], singles[i]) for i in range(4)), name
    with torch.no_grad():
        plain = greedy(model, ids, mask)
    assert not torch.equal(plain, out)
