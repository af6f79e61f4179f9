"""`prefill_once`: one prefill, one compressed cache per method — the same caches and continuations as one
prefill per method inside apply (what the KV benchmark relies on)."""

import pytest
import torch
from tiny_lm import left_pad, prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.runtime.prefill_once import prefill_once

METHODS = [("snapkv", dict(window_size=4)), ("pyramidkv", dict(window_size=4, beta=3)), ("h2o", {}),
           ("keyformer", dict(seed=2)), ("kvcrush", dict(base_params={"window_size": 4})), ("tova", {}),
           ("knorm", {}), ("streaming_llm", {}), ("kv_random", {})]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forked_caches_equal_one_prefill_per_method(arch):
    model = tiny_lm(arch, layers=6 if arch == "gemma3" else 3)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate([30, 17, 26])]
    ids, mask = left_pad(prompts)
    cont = prompt(3, seed=9, batch=3)
    cont_mask = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1)
    methods = [tr.get_method(name, keep_ratio=0.4, **kw) for name, kw in METHODS]
    with torch.no_grad():
        out, forks = prefill_once(model, ids, methods, attention_mask=mask)
        plain = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(out.logits, plain)  # the recording prefill is the plain prefill
        for m, (cache, stats, seconds) in zip(methods, forks):
            assert seconds > 0
            live = DynamicCache(config=model.config)
            with tr.apply(model, m) as h:
                model(ids, attention_mask=mask, past_key_values=live)
                live_stats = h.stats
                assert stats.kv_kept_per_layer == live_stats.kv_kept_per_layer
                assert stats.kv_bytes_after == live_stats.kv_bytes_after
                for a, b in zip(cache.layers, live.layers):
                    assert type(a) is type(b)
                    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), m.name
                    if hasattr(a, "kept"):
                        assert torch.equal(a.kept, b.kept)
                # continuing (a chunk, then a decoding step) gives the same logits
                x = model(cont, attention_mask=cont_mask, past_key_values=cache).logits
                y = model(cont, attention_mask=cont_mask, past_key_values=live).logits
                assert torch.equal(x, y), m.name


def test_bad_input():
    model = tiny_lm("llama")
    with pytest.raises(tr.StageError, match="kv-cache methods"):
        prefill_once(model, prompt(10), [tr.get_method("tome", keep_ratio=0.5)])
    with pytest.raises(tr.BudgetError):
        prefill_once(model, prompt(10), [tr.get_method("snapkv", keep_count=20)])
