"""Decode-time eviction (H2O): the cache never exceeds its budget while generating, and what it keeps and
generates equals a plain masked reference written from the paper (full cache, evicted entries masked)."""

import pytest
import torch
from tiny_lm import assert_restored, greedy, left_pad, prompt, snapshot, tiny_lm
from transformers import AttentionInterface, DynamicCache

import tokenreduce as tr
from tokenreduce.core.kv import CompressedLayer


def sharp(model, factor=10.0):
    """Peaky attention (logits x factor^2), so heavy hitters differ from "the first tokens" of near-uniform maps."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k after the projections
                attn.q_norm.weight.mul_(factor)
                attn.k_norm.weight.mul_(factor)
            else:
                layer.input_layernorm.weight.mul_(factor)
    return model


# ---------------------------------------------------------------------------- plain reference (from the paper)
class MaskedH2O:
    """H2O on a full cache: every layer keeps a boolean ``alive[H_kv, K]``; attention sees only alive entries.

    Scores (paper, Sec. 4): the softmax attention each entry received, summed over every query so far,
    per query head; a KV head ranks entries by its query heads' mean. After the prompt and after every
    decoding step: keep the ``recent`` newest entries and the ``budget - recent`` heaviest others."""

    def __init__(self, budget, recent, kv_heads):
        self.budget, self.recent, self.kv_heads = budget, recent, kv_heads
        self.alive, self.acc = {}, {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        li = module.layer_idx
        h, q, k = query.shape[1], query.shape[2], key.shape[2]
        g = h // key.shape[1]
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        logits = query @ key.transpose(-1, -2) * scaling
        causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
        alive = self.alive.get(li, torch.ones(self.kv_heads, k - q, dtype=torch.bool))
        alive = torch.cat([alive, torch.ones(self.kv_heads, q, dtype=torch.bool)], 1).repeat_interleave(g, 0)
        probs = logits.masked_fill(~(causal[None, None] & alive[None, :, None]), float("-inf")).softmax(-1)
        acc = self.acc.get(li, torch.zeros(h, 0, dtype=probs.dtype))
        acc = torch.cat([acc, torch.zeros(h, k - acc.shape[1], dtype=probs.dtype)], 1) + probs[0].sum(1)
        self.acc[li] = acc
        heavy = acc.reshape(self.kv_heads, g, k).mean(1).masked_fill(~alive[::g], float("-inf"))
        heavy[:, k - self.recent:] = float("inf")
        new_alive = torch.zeros(self.kv_heads, k, dtype=torch.bool)
        for j in range(self.kv_heads):
            order = sorted(range(k), key=lambda p: (-float(heavy[j, p]), -p))[: self.budget]
            new_alive[j, order] = True
        self.alive[li] = new_alive
        return (probs @ value).transpose(1, 2), probs


def reference_generate(arch, ids, budget, recent, new):
    model = sharp(tiny_lm(arch, attn="eager", dtype=torch.float64))
    ref = MaskedH2O(budget, recent, kv_heads=2)
    AttentionInterface.register("masked_h2o_reference", ref.attention)
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "config"):
            m.config._attn_implementation = "masked_h2o_reference"
    out = []
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
        for t in range(new):
            nxt = logits[:, -1:].argmax(-1)
            out.append(int(nxt))
            if t < new - 1:  # as generate: the last token is not fed back
                logits = model(nxt, past_key_values=cache).logits
    return out, ref.alive


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch,n,keep,frac", [("llama", 40, 12, 0.5), ("qwen3", 33, 9, 0.25), ("phi3", 30, 10, 0.0)])
def test_h2o_generates_and_keeps_as_the_masked_reference(arch, n, keep, frac):
    ids, new = prompt(n, seed=4), 7
    model = sharp(tiny_lm(arch, dtype=torch.float64))
    cache = DynamicCache()
    m = tr.get_method("h2o", keep_count=keep, recent_fraction=frac)
    with torch.no_grad(), tr.apply(model, m) as h:
        ours = greedy(model, ids, new=new, past_key_values=cache)[0].tolist()
        assert h.stats.kv_decode_slots == keep and h.stats.kv_decode_steps == new - 1
    ref, alive = reference_generate(arch, ids, keep, int(keep * frac), new)
    assert ours == ref
    for li, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedLayer) and layer.keys.shape[-2] == keep
        for j in range(2):  # the same entries (logical positions) per KV head
            assert layer.kept[0, j].tolist() == torch.nonzero(alive[li][j]).flatten().tolist()
    heads = [set(layer.kept[0, j].tolist()) for layer in cache.layers for j in range(2)]
    assert len({frozenset(s) for s in heads}) == len(heads)  # every layer and head evicts differently
    assert any(s != set(range(keep - int(keep * frac))) | set(range(n + new - 1 - int(keep * frac), n + new - 1))
               for s in heads)  # heavy hitters are not just the first tokens
    assert all(set(range(n + new - 1 - int(keep * frac), n + new - 1)) <= s for s in heads)  # the recent window


def test_budget_is_never_exceeded_while_generating():
    model, ids = tiny_lm("llama"), prompt(30)
    sizes = []
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("h2o", keep_ratio=0.3)):
        model(ids, past_key_values=cache)
        sizes.append([layer.keys.shape[-2] for layer in cache.layers])
        for t in range(12):
            model(prompt(1, seed=t), past_key_values=cache)
            sizes.append([layer.keys.shape[-2] for layer in cache.layers])
            assert cache.get_seq_length() == 31 + t  # logical length: positions of new tokens go on
    assert sizes == [[9, 9]] * 13


@pytest.mark.parametrize("name,kw", [("h2o", {})])
def test_padded_batch_generates_as_one_at_a_time(name, kw):
    model = tiny_lm("llama")
    lengths = [30, 17, 41, 9]
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method(name, keep_ratio=0.5, **kw)):
        out = greedy(model, ids, mask, new=10, past_key_values=cache)
        singles = [greedy(model, p[None], new=10)[0] for p in prompts]
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, pad_token_id=0)
    assert all(torch.equal(out[i], singles[i]) for i in range(4))
    assert cache.layers[0].slot_valid.sum(1).tolist() == [n // 2 for n in lengths]  # each sample its own budget
    assert sampled.shape == (4, ids.shape[1] + 5)


def test_continuing_question_chunk_is_evicted_back_to_budget_and_restores():
    model, ctx, question = tiny_lm("mistral"), prompt(40), prompt(6, seed=9)
    snap = snapshot(model)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("h2o", keep_ratio=0.25)):
        model(ctx, past_key_values=cache)
        model(question, past_key_values=cache)  # a multi-token chunk: attended, scored, evicted back to 10
        assert [layer.keys.shape[-2] for layer in cache.layers] == [10, 10]
        assert cache.get_seq_length() == 46
    assert_restored(model, snap)
    with torch.no_grad():  # after exit the plain model goes on with the compressed cache (no more eviction)
        model(prompt(1), past_key_values=cache)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [11, 11]


def test_h2o_is_registered_with_its_paper():
    info = {i.name: i for i in tr.list_methods("kv-cache")}["h2o"]
    assert info.arxiv == "2306.14048" and "recent_fraction" in info.native_params
    with pytest.raises(tr.BudgetError, match="recent_fraction"):
        tr.get_method("h2o", keep_ratio=0.5, recent_fraction=1.5)
