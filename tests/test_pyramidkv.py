"""PyramidKV: linear per-layer budgets with the mean budget exact, each layer selecting as SnapKV."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kv_methods import kept_sets, snapkv_reference
from tiny_lm import prompt, tiny_lm
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.methods.pyramidkv import pyramid_budgets


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3000), st.floats(1.0, 40.0), st.data())
def test_budgets_are_linear_with_the_exact_mean(layers, n, beta, data):
    mean = data.draw(st.integers(1, n))
    k = pyramid_budgets(torch.tensor([mean]), torch.tensor([n]), layers, beta)[:, 0]
    assert k.shape == (layers,) and (k >= 1).all() and (k <= n).all()
    assert (k.diff() <= 0).all()  # the bottom layer keeps the most
    if mean / beta >= 1:
        assert int(k.sum()) == layers * mean
    if layers > 2 and beta == 1.0:
        assert (k == mean).all()  # beta 1: uniform
    # the paper's endpoints, up to rounding: top = M / beta, bottom = 2M - M / beta (capped by the context)
    bottom = min(2 * mean - mean / beta, n)
    if layers > 1 and mean / beta >= 1:
        assert abs(float(k[0]) - bottom) <= 1.0 and abs(float(k[-1]) - (2 * mean - bottom)) <= 1.0


def test_each_layer_keeps_its_budget_by_snapkv():
    n, keep, window = 60, 20, 6
    ids = prompt(n, seed=7)
    model = tiny_lm("llama", layers=4, dtype=torch.float64)
    cache = DynamicCache()
    with torch.no_grad(), tr.apply(model, tr.get_method("pyramidkv", keep_count=keep, window_size=window,
                                                        beta=4)) as h:
        model(ids, past_key_values=cache)
    budgets = pyramid_budgets(torch.tensor([keep]), torch.tensor([n]), 4, 4.0)[:, 0].tolist()
    assert h.stats.kv_kept_per_layer == [float(b) for b in budgets] and sum(budgets) == 4 * keep
    assert budgets[0] > budgets[-1]
    ref_model = tiny_lm("llama", attn="eager", layers=4, dtype=torch.float64)
    with torch.no_grad():
        maps = [a[0] for a in ref_model(ids, output_attentions=True).attentions]
    for layer, b in enumerate(budgets):
        assert cache.layers[layer].keys.shape[-2] == b
        if b >= window:
            ref = snapkv_reference(maps[layer], n, b, window, 5, "avgpool", kv_heads=2)
        else:  # below the window: its most recent entries (no fallback to a uniform budget)
            ref = [set(range(n - b, n))] * 2
        assert kept_sets(cache, layer) == ref
    with torch.no_grad(), tr.apply(model, tr.get_method("pyramidkv", keep_count=keep, window_size=window)):
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # layers of different lengths decode
