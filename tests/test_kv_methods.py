"""Each kv-cache method keeps exactly what its paper says, checked against plain references written from the
papers (on the model's own eager attention maps, float64), alone and inside a left-padded batch."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_lm import left_pad, prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.core.kv import select_kept


def compress(model, ids, m, mask=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, m):
        model(ids, attention_mask=mask, past_key_values=cache)
    return cache


def eager_attentions(arch, ids, seed=0):
    """The plain model's full attention maps [H, N, N] per layer (eager, float64)."""
    ref = tiny_lm(arch, attn="eager", dtype=torch.float64, seed=seed)
    with torch.no_grad():
        return [a[0] for a in ref(ids, output_attentions=True).attentions]


def kept_sets(cache, layer, sample=0, offset=0):
    rows = cache.layers[layer].kept[sample]
    return [set((r[r >= 0] - offset).tolist()) for r in rows]


# ---------------------------------------------------------------------------- plain references (from the papers)
def top(scores, k):
    """Positions of the k highest scores; exact ties (max pooling makes them) go to the later position."""
    return set(sorted(range(len(scores)), key=lambda p: (-float(scores[p]), -p))[:k])


def snapkv_reference(attn, n, keep, window, kernel, pooling, kv_heads):
    """SnapKV (arXiv 2404.14469, Alg. 1): the window's votes for the prefix, pooled, top-k per head + the window.

    GQA: the query heads of a group average their pooled votes (kvpress / SnapKV#22)."""
    votes = attn[:, n - window:, : n - window].sum(1)  # [H, n - w]: summed over the observation window
    pad = kernel // 2
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes[None], kernel, stride=1, padding=pad)[0]
    grouped = pooled.reshape(kv_heads, -1, n - window).mean(1)
    return [top(g, keep - window) | set(range(n - window, n)) for g in grouped]


def tova_reference(attn, keep):
    """TOVA (arXiv 2401.06104): the last query's attention averaged over heads, top-k, same for all heads."""
    return top(attn[:, -1].mean(0), keep)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("window,kernel,pooling", [(8, 5, "avgpool"), (5, 7, "maxpool"), (1, 1, "avgpool")])
def test_snapkv_matches_the_paper(arch, window, kernel, pooling):
    n, keep = 48, 20
    ids = prompt(n, seed=1)
    attn = eager_attentions(arch, ids)
    model = tiny_lm(arch, dtype=torch.float64)  # SDPA: our scores come from Q and K, not from eager maps
    cache = compress(model, ids, tr.get_method("snapkv", keep_count=keep, window_size=window, kernel_size=kernel,
                                               pooling=pooling))
    for layer in range(2):
        assert kept_sets(cache, layer) == snapkv_reference(attn[layer], n, keep, window, kernel, pooling, kv_heads=2)
    assert kept_sets(cache, 0) != kept_sets(cache, 1)  # layers and heads choose differently


def test_snapkv_in_a_padded_batch_matches_the_paper_per_sample():
    lengths, ratio, window = [40, 23, 31], 0.5, 6
    prompts = [prompt(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    model = tiny_lm("llama", dtype=torch.float64)
    cache = compress(model, ids, tr.get_method("snapkv", keep_ratio=ratio, window_size=window), mask)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        attn = eager_attentions("llama", p[None])
        for layer in range(2):
            ref = snapkv_reference(attn[layer], n, int(n * ratio), window, 5, "avgpool", kv_heads=2)
            assert kept_sets(cache, layer, i, offset=ids.shape[1] - n) == ref


def test_snapkv_short_context_keeps_the_most_recent():
    """Budget below the window: the window (the last tokens) is all that fits, most recent first."""
    model, ids = tiny_lm("llama"), prompt(20)
    cache = compress(model, ids, tr.get_method("snapkv", keep_count=5, window_size=8))
    assert kept_sets(cache, 0) == [set(range(15, 20))] * 2


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_tova_matches_the_paper(arch):
    n, keep = 40, 13
    ids = prompt(n, seed=2)
    attn = eager_attentions(arch, ids)
    cache = compress(tiny_lm(arch, dtype=torch.float64), ids, tr.get_method("tova", keep_count=keep))
    for layer in range(2):
        ref = tova_reference(attn[layer], keep)
        assert kept_sets(cache, layer) == [ref, ref]


@pytest.mark.parametrize("keep,sinks", [(12, 4), (3, 4), (10, 0)])
def test_streaming_llm_keeps_exactly_sinks_and_recent(keep, sinks):
    n = 30
    cache = compress(tiny_lm("qwen2"), prompt(n), tr.get_method("streaming_llm", keep_count=keep, n_sink=sinks))
    s = min(sinks, keep)
    ref = set(range(s)) | set(range(n - (keep - s), n))
    assert all(kept_sets(cache, layer) == [ref, ref] for layer in range(2))


def test_knorm_keeps_the_lowest_key_norms_per_head():
    n, keep = 36, 9
    model, ids = tiny_lm("llama", dtype=torch.float64), prompt(n, seed=3)
    plain = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=plain)
    cache = compress(model, ids, tr.get_method("knorm", keep_count=keep))
    for layer in range(2):
        norms = plain.layers[layer].keys[0].norm(dim=-1)  # [H_kv, n]
        ref = [top(-h, keep) for h in norms]
        assert kept_sets(cache, layer) == ref
        assert ref[0] != ref[1]
        # and the kept keys/values are the cached ones, in order
        idx = cache.layers[layer].kept[0]
        for h in range(2):
            assert torch.equal(cache.layers[layer].keys[0, h], plain.layers[layer].keys[0, h, idx[h]])
            assert torch.equal(cache.layers[layer].values[0, h], plain.layers[layer].values[0, h, idx[h]])


def test_kv_random_is_seeded_and_batch_consistent():
    lengths = [25, 14]
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(prompts)
    model = tiny_lm("llama")
    m = tr.get_method("kv_random", keep_ratio=0.4, seed=7)
    batch = compress(model, ids, m, mask)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        alone = compress(model, p[None], m)
        assert kept_sets(batch, 0, i, offset=ids.shape[1] - n) == kept_sets(alone, 0)
    again = compress(model, prompts[0][None], tr.get_method("kv_random", keep_ratio=0.4, seed=7))
    other = compress(model, prompts[0][None], tr.get_method("kv_random", keep_ratio=0.4, seed=8))
    assert kept_sets(again, 1) == kept_sets(compress(model, prompts[0][None], m), 1)
    assert kept_sets(other, 1) != kept_sets(again, 1)


def test_registry_lists_the_kv_methods_with_their_papers():
    infos = {i.name: i for i in tr.list_methods("kv-cache")}
    assert {"snapkv", "streaming_llm", "tova", "knorm", "kv_random", "h2o"} <= set(infos)
    assert infos["snapkv"].arxiv == "2404.14469" and infos["tova"].arxiv == "2401.06104"
    assert infos["streaming_llm"].arxiv == "2309.17453" and infos["knorm"].arxiv == "2406.11430"
    assert "window_size" in infos["snapkv"].native_params


# ---------------------------------------------------------------------------- selection properties
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.data())
def test_select_kept_properties(b, h, n, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.randn(b, h, n, generator=g).round(decimals=1)  # ties happen
    lengths = torch.tensor([data.draw(st.integers(1, n)) for _ in range(b)])
    valid = torch.arange(n)[None, :] >= (n - lengths)[:, None]  # left padding
    budgets = torch.tensor([data.draw(st.integers(1, int(lengths[i]))) for i in range(b)])
    kept = select_kept(scores, valid, budgets)
    assert kept.shape == (b, h, int(budgets.max()))
    for i in range(b):
        for j in range(h):
            row = kept[i, j]
            real = row[row >= 0]
            assert len(real) == budgets[i] and (row[: len(row) - len(real)] == -1).all()  # left-padded
            assert (real.diff() > 0).all() and valid[i, real].all()  # ascending, never padding
            dropped = [p for p in range(n) if valid[i, p] and p not in set(real.tolist())]
            if dropped:
                worst_kept = scores[i, j, real].min()
                best_dropped = scores[i, j, dropped].max()
                assert worst_kept >= best_dropped
                if worst_kept == best_dropped:  # ties go to the more recent entry
                    assert max(p for p in dropped if scores[i, j, p] == best_dropped) < \
                        min(int(p) for p in real if scores[i, j, p] == worst_kept)
