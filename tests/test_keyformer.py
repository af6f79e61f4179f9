"""Keyformer: Gumbel-noised accumulated scores with a temperature schedule, on H2O's decode-time eviction."""

import pytest
import torch
from test_h2o import sharp
from test_kv_methods import kept_sets, top
from tiny_lm import prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr


def reference_prefill_keep(attn_maps, keep, recent, seed, tau, kv_heads=2):
    """Keyformer (arXiv 2403.09054, eq. 4-5) at the prompt: per layer, sum over query rows of
    softmax((logits + G) / tau) with standard Gumbel G drawn layer after layer from one seeded generator;
    log(probs) stands in for the logits (a row's constant cancels in the softmax)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for probs in attn_maps:  # [H, N, N] float64 eager maps
        h, n, _ = probs.shape
        u = torch.rand((1, h, n, n), generator=g, dtype=torch.float64).clamp(1e-20, 1.0 - 1e-16)
        noise = -torch.log(-torch.log(u))[0]
        acc = ((probs.log() + noise) / tau).softmax(-1).sum(1)  # [H, N]
        grouped = acc.reshape(kv_heads, -1, n).mean(1)
        out.append([top(gr, keep - recent) | set(range(n - recent, n)) if keep > recent else set(range(n - keep, n))
                    for gr in grouped.clone().index_fill_(1, torch.arange(n - recent, n), float("-inf"))])
    return out


def test_prefill_matches_the_paper_with_the_same_noise():
    n, keep, recent = 44, 15, 4
    ids = prompt(n, seed=5)
    ref_model = sharp(tiny_lm("llama", attn="eager", dtype=torch.float64))
    with torch.no_grad():
        maps = [a[0] for a in ref_model(ids, output_attentions=True).attentions]
    model = sharp(tiny_lm("llama", dtype=torch.float64))
    m = tr.get_method("keyformer", keep_count=keep, recent_fraction=recent / keep, seed=3, tau_init=1.5)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, m):
        model(ids, past_key_values=cache)
    ref = reference_prefill_keep(maps, keep, recent, seed=3, tau=1.5)
    assert [kept_sets(cache, layer) for layer in range(2)] == ref
    plain = tr.get_method("h2o", keep_count=keep, recent_fraction=recent / keep)
    h2o_cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, plain):
        model(ids, past_key_values=h2o_cache)
    assert [kept_sets(h2o_cache, layer) for layer in range(2)] != ref  # the noise changes what is kept


def test_seeded_and_budgeted_while_generating():
    model, ids = tiny_lm("qwen2"), prompt(30)
    kept = []
    for seed in (0, 0, 1):
        cache = DynamicCache()
        with torch.no_grad(), tr.apply(model, tr.get_method("keyformer", keep_ratio=0.4, seed=seed)) as h:
            model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache)
            assert h.stats.kv_decode_slots == 12
        assert [layer.keys.shape[-2] for layer in cache.layers] == [12, 12]
        kept.append([layer.kept.tolist() for layer in cache.layers])
    assert kept[0] == kept[1] and kept[0] != kept[2]


def test_temperature_schedule_and_errors():
    m = tr.get_method("keyformer", keep_ratio=0.5, tau_init=1.0, tau_end=2.0, max_new_tokens=4)
    assert [m.tau(t) for t in range(7)] == [1.0, 1.25, 1.5, 1.75, 2.0, 2.0, 2.0]
    info = {i.name: i for i in tr.list_methods("kv-cache")}["keyformer"]
    assert info.arxiv == "2403.09054" and {"tau_init", "tau_end", "seed"} <= set(info.native_params)
    with pytest.raises(tr.BudgetError, match="temperatures"):
        tr.get_method("keyformer", keep_ratio=0.5, tau_init=0.0)
