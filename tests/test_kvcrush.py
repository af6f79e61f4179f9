"""KVCrush: representatives of the evicted tokens by head-behaviour signatures, on top of an importance method."""

import pytest
import torch
import torch.nn.functional as F
from test_h2o import sharp
from test_kv_methods import kept_sets, top
from tiny_lm import left_pad, prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr


def kvcrush_snapkv_reference(attn, n, keep, window, kernel, fraction, anchor_bits, kv_heads=2):
    """From the KVCrush description (arXiv 2503.00022) over SnapKV's scores, in plain loops."""
    h = attn.shape[0]
    votes = attn[:, n - window:, :].mean(1)
    votes[:, n - window:] = 0.0
    pooled = F.avg_pool1d(votes[None], kernel, stride=1, padding=kernel // 2)[0]  # [H, n] per query head
    grouped = pooled.reshape(kv_heads, -1, n).mean(1)
    window_set = set(range(n - window, n))
    count = int(keep * fraction)
    evictable = [j for j in range(n) if j not in window_set]
    important = set()
    for g in grouped:  # the window (forced) first, then the best of the rest, per KV head
        important |= window_set | top([float(g[j]) if j not in window_set else float("-inf") for j in range(n)],
                                      keep - count - window)
    half = len(evictable) // 2
    bits = []
    for q in range(h):
        best = top([float(pooled[q, j]) if j in evictable else float("-inf") for j in range(n)], half)
        bits.append([j in best for j in range(n)])
    distance = {j: sum(bits[q][j] != anchor_bits[q] for q in range(h)) for j in evictable}
    candidates = sorted((j for j in evictable if j not in important), key=lambda j: (distance[j], j))
    ranks = torch.linspace(0, len(candidates) - 1, count).long().tolist()
    reps = {candidates[r] for r in ranks}
    return [top([float("inf") if j in window_set or j in reps else float(g[j]) for j in range(n)], keep)
            for g in grouped], reps


@pytest.mark.parametrize("anchor", ["alternate", "zeros"])
def test_matches_the_plain_reference(anchor):
    n, keep, window = 64, 24, 4
    ids = prompt(n, seed=11)
    ref_model = sharp(tiny_lm("llama", attn="eager", dtype=torch.float64), 3.0)
    with torch.no_grad():
        maps = [a[0] for a in ref_model(ids, output_attentions=True).attentions]
    model = sharp(tiny_lm("llama", dtype=torch.float64), 3.0)
    cache = DynamicCache()
    m = tr.get_method("kvcrush", keep_count=keep, crush_fraction=0.25, anchor=anchor,
                      base_params={"window_size": window})
    with torch.no_grad(), tr.apply(model, m):
        model(ids, past_key_values=cache)
    anchor_bits = [q % 2 == 1 for q in range(4)] if anchor == "alternate" else [False] * 4
    snap = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("snapkv", keep_count=keep, window_size=window)):
        model(ids, past_key_values=snap)
    for layer in range(2):
        ref, reps = kvcrush_snapkv_reference(maps[layer], n, keep, window, 5, 0.25, anchor_bits)
        ours = kept_sets(cache, layer)
        assert ours == ref
        assert len(reps) == 6 and all(reps <= s for s in ours)  # shared by every KV head
        assert ours != kept_sets(snap, layer)  # representatives replace some of SnapKV's picks


def test_zero_fraction_is_the_base_and_batches_are_per_sample():
    lengths = [40, 23]
    prompts = [prompt(k, seed=20 + i)[0] for i, k in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    model = tiny_lm("qwen2")
    for base in ("snapkv", "tova"):
        a, b = DynamicCache(), DynamicCache()
        with torch.no_grad():
            with tr.apply(model, tr.get_method("kvcrush", keep_ratio=0.5, base=base, crush_fraction=0.0)):
                model(ids, attention_mask=mask, past_key_values=a)
            with tr.apply(model, tr.get_method(base, keep_ratio=0.5)):
                model(ids, attention_mask=mask, past_key_values=b)
        assert all(torch.equal(x.kept, y.kept) for x, y in zip(a.layers, b.layers))
    m = tr.get_method("kvcrush", keep_ratio=0.5, base="snapkv", base_params={"window_size": 4})
    with torch.no_grad(), tr.apply(model, m):
        batch = DynamicCache()
        model(ids, attention_mask=mask, past_key_values=batch)
        for i, (p, k) in enumerate(zip(prompts, lengths)):
            alone = DynamicCache()
            model(p[None], past_key_values=alone)
            assert kept_sets(batch, 1, i, offset=ids.shape[1] - k) == kept_sets(alone, 1)


def test_errors():
    with pytest.raises(tr.StageError, match="evicts again while decoding"):
        tr.get_method("kvcrush", keep_ratio=0.5, base="h2o")
    with pytest.raises(tr.BudgetError, match="anchor"):
        tr.get_method("kvcrush", keep_ratio=0.5, anchor="median")
    with pytest.raises(tr.StageError, match="unknown method"):
        tr.get_method("kvcrush", keep_ratio=0.5, base="snap")
