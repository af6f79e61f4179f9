"""StreamingLLM's rolling cache (arXiv 2309.17453, Sec. 3.2): sinks + recent at a fixed size while decoding, and
positions within the cache — checked against a plain reference that re-rotates keys with complex numbers."""

import pytest
import torch
from tiny_lm import greedy, left_pad, prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.runtime.prefill_once import prefill_once


def complex_rotate(k, delta, inv_freq):
    """RoPE as complex multiplication: pairs (i, i + D/2) times e^{i delta theta_i}."""
    d = k.shape[-1] // 2
    z = torch.complex(k[..., :d], k[..., d:]) * torch.polar(torch.ones(1, dtype=torch.float64),
                                                             delta[..., None].double() * inv_freq.double())
    return torch.cat([z.real, z.imag], -1).to(k.dtype)


def reference_rolling(model, ids, budget, sinks, new):
    """The paper's rolling cache by hand: keep sinks + recent, positions 0..M-1 in the cache, evict the oldest
    non-sink after every step, every later key moved one position down."""
    inv = model.model.rotary_emb.inv_freq
    n = ids.shape[1]
    full = DynamicCache()
    with torch.no_grad():
        logits = model(ids, past_key_values=full).logits[:, -1]
    kept = list(range(sinks)) + list(range(n - (budget - sinks), n))
    delta = torch.tensor([j - p for j, p in enumerate(kept)])
    keys = [complex_rotate(layer.keys[:, :, kept], delta, inv) for layer in full.layers]
    values = [layer.values[:, :, kept] for layer in full.layers]
    out = []
    for t in range(new):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        if t == new - 1:
            break
        cache = DynamicCache()
        for li in range(len(keys)):
            cache.update(keys[li], values[li], li)
        with torch.no_grad():
            logits = model(nxt, past_key_values=cache, position_ids=torch.tensor([[budget]])).logits[:, -1]
        for li, layer in enumerate(cache.layers):  # evict slot `sinks`, move the later ones down by one
            k = torch.cat([layer.keys[:, :, :sinks], complex_rotate(layer.keys[:, :, sinks + 1:],
                                                                     torch.tensor(-1), inv)], 2)
            keys[li], values[li] = k, torch.cat([layer.values[:, :, :sinks], layer.values[:, :, sinks + 1:]], 2)
    return out, keys


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rolling_cache_matches_the_paper(arch):
    model = tiny_lm(arch, dtype=torch.float64)
    ids, budget, sinks, new = prompt(36), 12, 4, 9
    ref, ref_keys = reference_rolling(model, ids, budget, sinks, new)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("streaming_llm", keep_count=budget, n_sink=sinks,
                                                        rolling=True)) as h:
        ours = greedy(model, ids, new=new, past_key_values=cache)[0].tolist()
        assert h.stats.kv_decode_slots == budget
    assert ours == ref
    for layer, k in zip(cache.layers, ref_keys):
        assert layer.keys.shape[-2] == budget and layer.rotary[0, 0].tolist() == list(range(budget))
        torch.testing.assert_close(layer.keys, k, rtol=1e-9, atol=1e-9)
    assert cache.layers[0].kept[0, 0].tolist() == list(range(sinks)) + list(range(36 + new - 1 - (budget - sinks), 36 + new - 1))
    kept = cache.layers[0].kept[0, 0]
    assert not torch.equal(kept, torch.arange(budget))  # the recent keys really moved (positions != text positions)
    with pytest.raises(tr.StageError, match="in-cache positions"), torch.no_grad():
        model(prompt(1), past_key_values=cache)  # outside apply: the shifted positions would be lost


def test_rolling_padded_batch_and_refusals():
    model = tiny_lm("llama")
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate([30, 17, 24])]
    ids, mask = left_pad(prompts)
    m = tr.get_method("streaming_llm", keep_ratio=0.5, rolling=True)
    with torch.no_grad(), tr.apply(model, m):
        out = greedy(model, ids, mask, new=8)
        singles = [greedy(model, p[None], new=8)[0] for p in prompts]
    assert all(torch.equal(out[i], singles[i]) for i in range(3))
    with pytest.raises(tr.StageError, match="inside tokenreduce.apply"):
        prefill_once(model, ids, [m])
    with pytest.raises(tr.StageError, match="sliding-window"), torch.no_grad():
        tr.apply(tiny_lm("gemma3", layers=6), m).__enter__()
