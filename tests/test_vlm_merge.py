"""In-LLM methods that merge, pool or recycle visual tokens (LLaVolta, VisionDrop, SparseVLM): the prefill under
the method equals a plain reference written from each paper — the language model run by hand from the drop layer
on the reduced tokens at their positions — and the runtime's checks on a method's plan."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_vlm import IMAGE_ID, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.core.method import LayerDropMethod
from tokenreduce.core.reduction import Reduction

TEXTS = [(3, 5), (1, 2), (4, 7)]


def lm_states(model, inputs):
    """Hidden states entering each layer of the language model (index k = layer k's input)."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


def continue_from(model, k: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The plain reference: layers k.. of the language model run by hand on ``hidden`` [1, n, D] at ``positions``
    [n] (causal, no padding); the last row's logits."""
    lm = model.model.language_model
    pos = positions[None]
    emb = lm.rotary_emb(hidden, pos)
    with torch.no_grad():
        for layer in lm.layers[k:]:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
        return model.lm_head(lm.norm(hidden))[0, -1]


def under(model, inputs, method):
    with torch.no_grad(), tr.apply(model, method) as h:
        out = model(**inputs).logits[0, -1]
    return out, h.stats


def visual_rows(ids: torch.Tensor) -> torch.Tensor:
    return (ids[0] == IMAGE_ID).nonzero().flatten()


# ---------------------------------------------------------------------------- LLaVolta
@pytest.mark.parametrize("sample", [0, 1])
@pytest.mark.parametrize("stride", [4, 3])
def test_llavolta_pools_windows_of_stride_tokens_at_their_middle_position(sample, stride):
    """Reference (visual_avg_pool1d): from layer K each window of ``s`` consecutive visual tokens is their mean, at
    the truncated mean of the window's positions; a remainder shorter than ``s`` is dropped; text untouched."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), sample)
    k = 1
    x = lm_states(model, inputs)[k][0]
    vis = visual_rows(inputs["input_ids"])
    n = vis.numel()
    rows, positions = [], []
    text = [i for i in range(x.shape[0]) if i not in set(vis.tolist())]
    windows = [vis[w * stride:(w + 1) * stride] for w in range(n // stride)]
    items = [(i, x[i]) for i in text] + [(int(torch.div(w.float().mean(), 1, rounding_mode="floor")), x[w].mean(0))
                                         for w in windows]
    items.sort(key=lambda t: t[0])
    rows = torch.stack([v for _, v in items])[None]
    positions = torch.tensor([p for p, _ in items])
    want = continue_from(model, k, rows, positions)
    got, stats = under(model, inputs, tr.get_method("llavolta", layer=k, stride=stride))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats.visual_tokens_per_layer == [n, n // stride, n // stride]


def test_llavolta_keep_ratio_is_the_layer_mean_and_windows_cover_every_token():
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    _, stats = under(model, inputs, tr.get_method("llavolta", keep_ratio=0.5, layer=1))
    n = stats.visual_tokens
    # (1 * n + 2 * m) / 3 = 0.5 n  ->  m = floor(0.25 n)
    assert stats.visual_tokens_per_layer == [n, math.floor(0.25 * n), math.floor(0.25 * n)]
    with pytest.raises(tr.BudgetError, match="lowest is 0.333"):
        tr.patch(model, tr.get_method("llavolta", keep_ratio=0.3, layer=1))
    with pytest.raises(tr.BudgetError, match="stride"):
        tr.get_method("llavolta", keep_ratio=0.5, stride=4)


# ---------------------------------------------------------------------------- the runtime's checks on a plan
class _BadPlan(LayerDropMethod):
    name = "bad_plan_for_test"
    attention_rows = "none"

    def native_schedule(self, info):
        return [(1, 0.5)]

    def plan(self, ctx):
        n = int(ctx.visual.sum())
        return Reduction.keep(torch.arange(n - 1)[None], n - 1)  # maps n - 1 tokens, not n


def test_a_plan_over_the_wrong_tokens_is_the_methods_bug_and_says_so():
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    with pytest.raises(tr.StageError, match="the plan maps 1 x 15 tokens; expected 1 x 16"):
        with torch.no_grad(), tr.apply(model, _BadPlan()):
            model(**inputs)
