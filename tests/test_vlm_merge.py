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


# ---------------------------------------------------------------------------- VisionDrop
def own_projections(model, k: int, x: torch.Tensor, positions: torch.Tensor):
    """Layer k's norm, Q/K projections and RoPE on its input x [n, D]: (q [H, n, d], k [H, n, d]) with KV heads
    repeated (GQA)."""
    import transformers as tf

    lm = model.model.language_model
    layer = lm.layers[k]
    a = layer.self_attn
    n, hd = x.shape[0], a.head_dim
    h = layer.input_layernorm(x[None])
    q = a.q_proj(h).view(1, n, -1, hd).transpose(1, 2)
    kk = a.k_proj(h).view(1, n, -1, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, positions[None])
    q, kk = tf.models.llama.modeling_llama.apply_rotary_pos_emb(q, kk, cos, sin)
    kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
    return q[0], kk[0]


@pytest.mark.parametrize("sample", [0, 2])
def test_visiondrop_keeps_the_visual_tokens_other_visual_tokens_attend_and_merges_the_rest(sample):
    """Reference (visiondrop_rank_drop): layer K's own Q/K with RoPE, the visual rows' causal softmax over all keys,
    mean over heads, mean over the visual rows -> top d dominant; the rest merged on their head-mean post-RoPE keys
    into c targets at a uniform stride, contextual = target + mean of the joined."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), sample)
    k, n_keep, frac = 1, 8, 0.25
    x = lm_states(model, inputs)[k][0]
    n = x.shape[0]
    pos = torch.arange(n)
    vis = visual_rows(inputs["input_ids"])
    with torch.no_grad():
        q, kk = own_projections(model, k, x, pos)
        logits = (q @ kk.transpose(-1, -2)) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        a = logits.softmax(-1).mean(0)
    score = a[vis][:, vis].mean(0)
    c = round(frac * n_keep)
    d = n_keep - c
    dom = score.topk(d).indices
    rest = [j for j in range(vis.numel()) if j not in set(dom.tolist())]
    metric = kk.mean(0)[vis][rest]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // c)
    targets = list(range(0, len(rest), step))[:c]
    members = {t: [] for t in targets}
    for i in range(len(rest)):
        if i not in targets:
            members[targets[int((metric[i] @ metric[targets].T).argmax())]].append(i)
    items = [(int(p), x[p]) for p in range(n) if p not in set(vis.tolist())]
    items += [(int(vis[j]), x[vis[j]]) for j in dom.tolist()]
    for t, joined in members.items():
        value = x[vis[rest[t]]] + (x[vis[[rest[i] for i in joined]]].mean(0) if joined else 0)
        items.append((int(vis[min([rest[t]] + [rest[i] for i in joined])]), value))
    items.sort(key=lambda t: t[0])
    want = continue_from(model, k, torch.stack([v for _, v in items])[None], torch.tensor([p for p, _ in items]))
    got, stats = under(model, inputs, tr.get_method("visiondrop", layers=[k], ratios=[n_keep / vis.numel()],
                                                    contextual_fraction=frac))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats.visual_tokens_per_layer == [vis.numel(), n_keep, n_keep]


def test_visiondrop_default_stages_split_as_the_reference_table():
    from tokenreduce.methods.visionzip import split_budget

    assert [split_budget(k, 10 / 64) for k in (35, 26, 19)] == [(30, 5), (22, 4), (16, 3)]
    method = tr.get_method("visiondrop")
    info = type("Info", (), {"num_layers": 32})()
    assert method.schedule(info) == [(8, 35 / 48), (16, 26 / 48), (24, 19 / 48)]
    fitted = tr.get_method("visiondrop", keep_ratio=0.4).schedule(info)
    assert abs(LayerDropMethod.mean_kept(fitted, 32) - 0.4) < 1e-6
    with pytest.raises(tr.BudgetError, match="one ratio per stage"):
        tr.get_method("visiondrop", ratios=[0.5]).schedule(info)


# ---------------------------------------------------------------------------- SparseVLM
def plain_dpc_knn(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-kNN as the reference's cluster_and_merge, ties to the earlier token instead of noise."""
    n = x.shape[0]
    d = torch.tensor([[float((x[i] - x[j]).norm()) for j in range(n)] for i in range(n)]) / x.shape[1] ** 0.5
    rho = torch.tensor([math.exp(-float((d[i].sort().values[:clusters] ** 2).mean())) for i in range(n)])
    delta = []
    for i in range(n):
        higher = [float(d[i, j]) for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(higher) if higher else float(d.max()))
    centres = (rho * torch.tensor(delta)).topk(clusters).indices.tolist()
    return torch.tensor([centres.index(i) if i in centres else int(d[i, centres].argmin()) for i in range(n)])


@pytest.mark.parametrize("version", ["v1.5", "v2"])
@pytest.mark.parametrize("sample", [0, 2])
def test_sparsevlm_raters_score_the_visual_tokens_and_the_best_dropped_are_recycled(version, sample):
    """Reference (SparseVLMs score.py / cluster_and_merge): raters = text after the image whose mean (over visual
    tokens) softmax-over-text of v.t is above the mean; score = layer l's attention probabilities from the raters,
    mean over heads and raters (v2: divided by the RoPE-only logits, top heads by rater-to-visual mass); keep the top
    k; v1.5: the top 30 % + 1 dropped, DPC-kNN into n/10 + 1 clusters, each cluster's mean one more token."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), sample)
    k, target = 1, 192
    eager = tiny_vlm("llava", attn="eager")
    with torch.no_grad():
        out = eager(**inputs, output_hidden_states=True, output_attentions=True)
    x, emb = out.hidden_states[k][0], out.hidden_states[0][0]
    probs = out.attentions[k - 1][0]  # [H, n, n] layer l = k - 1
    n = x.shape[0]
    vis = visual_rows(inputs["input_ids"])
    text = torch.arange(int(vis[-1]) + 1, n)
    m = (emb[vis] @ emb[text].T).softmax(-1).mean(0)
    judges = text[m > m.mean()]
    if version == "v2":
        cos, sin = model.model.language_model.rotary_emb(x[None], torch.arange(n)[None])
        q = torch.ones(1, 1, n, cos.shape[-1])
        qr, kr = __import__("transformers").models.llama.modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
        probs = probs / ((qr @ kr.transpose(-1, -2))[0, 0] / cos.shape[-1] ** 0.5)
        heads = max(1, round(14 / 32 * probs.shape[0]))
        mass = probs[:, judges][:, :, vis].sum((1, 2))
        probs = probs[mass.topk(heads).indices]
    score = probs.mean(0)[judges][:, vis].mean(0)
    keep = min(math.floor(vis.numel() * 300 / 576 + 1e-9), vis.numel() - 1)
    order = score.sort(descending=True, stable=True).indices
    items = [(int(p), x[p]) for p in range(n) if p not in set(vis.tolist())]
    items += [(int(vis[j]), x[vis[j]]) for j in order[:keep].tolist()]
    if version == "v1.5":
        dropped = order[keep:]
        rec = dropped[:int(dropped.numel() * 0.3) + 1]
        group = plain_dpc_knn(x[vis[rec]], rec.numel() // 10 + 1)
        for g in range(int(group.max()) + 1):
            members = vis[rec[group == g]]
            items.append((int(members.min()), x[members].mean(0)))
    items.sort(key=lambda t: t[0])
    want = continue_from(model, k, torch.stack([v for _, v in items])[None], torch.tensor([p for p, _ in items]))
    got, stats = under(model, inputs, tr.get_method("sparsevlm", target=target, version=version, layers=[k]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats.visual_tokens_per_layer[1] == len(items) - (n - vis.numel())


def test_sparsevlm_tables_scale_to_the_depth_and_keep_ratio_meets_the_layer_mean():
    info = type("Info", (), {"num_layers": 32})()
    assert tr.get_method("sparsevlm").schedule(info) == [(3, 300 / 576), (7, 200 / 576), (16, 110 / 576)]
    assert [k for k, _ in tr.get_method("sparsevlm", version="v2", target=64).schedule(info)] == [3, 7, 16]
    fitted = tr.get_method("sparsevlm", keep_ratio=0.25).schedule(info)
    assert abs(LayerDropMethod.mean_kept(fitted, 32) - 0.25) < 1e-6
    with pytest.raises(tr.ParameterError, match="target must be one of 192, 128, 96, 64"):
        tr.get_method("sparsevlm", target=100)
    with pytest.raises(tr.BudgetError, match="version='v2'"):
        tr.get_method("sparsevlm", top_heads=4)
    with pytest.raises(tr.BudgetError, match="pass layers"):
        tr.patch(tiny_vlm("llava"), tr.get_method("sparsevlm"))


# ---------------------------------------------------------------------------- after a connector method
def test_an_in_llm_method_after_a_connector_reduces_the_rewritten_prompt_at_its_positions():
    """VisionZip at the connector, then LLaVolta at layer 1: the language model's layers from 1 on run on the text
    and the pooled pairs of VisionZip's tokens, each at its pair's middle member's original position."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 2)
    connector = tr.get_method("visionzip", keep_ratio=0.5)
    with torch.no_grad(), tr.apply(model, connector) as h:
        x = model(**inputs, output_hidden_states=True).hidden_states[1][0]
    kept = torch.tensor(h.stats.kept_positions[0])  # the rewritten rows' prompt positions
    span = set(visual_rows(inputs["input_ids"]).tolist())
    vis = torch.tensor([i for i, p in enumerate(kept.tolist()) if p in span])
    items = [(int(kept[i]), x[i]) for i in range(kept.numel()) if i not in set(vis.tolist())]
    for w in range(vis.numel() // 2):
        pair = vis[2 * w:2 * w + 2]
        items.append((int(kept[pair[0]]), x[pair].mean(0)))
    items.sort(key=lambda t: t[0])
    want = continue_from(model, 1, torch.stack([v for _, v in items])[None], torch.tensor([p for p, _ in items]))
    with torch.no_grad(), tr.apply(model, tr.get_method("visionzip", keep_ratio=0.5),
                                   tr.get_method("llavolta", layer=1, stride=2)) as h:
        got = model(**inputs).logits[0, -1]
        stages = h.stats_by_stage
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stages["decoder"].visual_tokens_per_layer == [8, 4, 4]
    assert stages["decoder"].flops_full == 0 and stages["connector"].flops_full > 0  # counted once


def test_an_in_llm_method_after_a_connector_generates_a_padded_batch_as_its_samples():
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    methods = lambda: (tr.get_method("fastervlm", keep_ratio=0.5),  # noqa: E731
                       tr.get_method("visiondrop", layers=[1, 2], keep_ratio=0.8))
    with torch.no_grad(), tr.apply(model, *methods()):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
        singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                   for i in range(len(TEXTS))]
    for i, single in enumerate(singles):
        assert torch.equal(out[i], single), i
    with pytest.raises(tr.StageError, match="kv-cache"):
        tr.patch(model, tr.get_method("fastv", k=1), tr.get_method("snapkv", keep_ratio=0.5))
