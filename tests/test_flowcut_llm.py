"""FlowCut's language-model stage (`methods.flowcut_llm`) against a plain reference written from the paper."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_vlm import TEXTS, eager_lm_attentions, image_span
from tiny_vlm import one, tiny_vlm, vlm_batch

import tokenreduce as tr


def plain_flowcut_llm(model, inputs, layer: int, keep: int) -> list[int]:
    """Layer ``layer - 1``'s norm, Q/K/V projections and RoPE on its input; per query head (keys and values repeated
    to the query heads, as the reference does) the last token's softmax over the visual keys alone and the softmax
    of its value against the visual values; both averaged over heads, each normalised to sum 1, added, times the
    L1 norm of the head-averaged visual values; the top ``keep`` visual tokens, in prompt order."""
    out, _ = eager_lm_attentions("llava", inputs)
    lm = model.model.language_model
    block = lm.layers[layer - 1]
    x = block.input_layernorm(out.hidden_states[layer - 1])
    a = block.self_attn
    n, hd, heads, kv = x.shape[1], 16, 4, 2
    q = a.q_proj(x).view(1, n, heads, hd).transpose(1, 2)
    k = a.k_proj(x).view(1, n, kv, hd).transpose(1, 2)
    v = a.v_proj(x).view(1, n, kv, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, torch.arange(n)[None])
    q, k = tf.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(heads // kv, dim=1)[0], v.repeat_interleave(heads // kv, dim=1)[0]
    span = image_span(inputs["input_ids"])
    vis = list(span)
    relation = ((q[0, :, -1:] @ k[:, vis].transpose(-1, -2)) / hd ** 0.5).softmax(-1)[:, 0].mean(0)
    semantic = ((v[:, -1:] @ v[:, vis].transpose(-1, -2)) / hd ** 0.5).softmax(-1)[:, 0].mean(0)
    score = (relation / relation.sum() + semantic / semantic.sum()) * v[:, vis].mean(0).abs().sum(-1)
    return (score.topk(keep).indices.sort().values + span.start).tolist()


@pytest.mark.parametrize("sample", [0, 2])
def test_kept_tokens_equal_the_plain_reference(sample):
    """Cut at layer 1 (scored in layer 0), keep_ratio 2/3 of 3 layers: half of the 16 visual tokens from layer 1."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), sample)
    want = plain_flowcut_llm(model, inputs, layer=1, keep=8)
    with torch.no_grad(), tr.apply(model, tr.get_method("flowcut_llm", keep_ratio=2 / 3, layer=1)) as h:
        model(**inputs)
    span = image_span(inputs["input_ids"])
    assert [p for p in h.stats.kept_positions[1][0] if p in span] == want
    assert h.stats.visual_tokens_per_layer == [16, 8, 8]


def test_the_reference_layer_and_a_schedule():
    """Default: cut at layer 2 (scored in layer 1, the reference's prune_layer); a schedule scores each drop alike."""
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 1)
    want = plain_flowcut_llm(model, inputs, layer=2, keep=4)
    for method in (tr.get_method("flowcut_llm", keep_ratio=(2 + 0.25) / 3),
                   tr.get_method("flowcut_llm", schedule=[(2, 0.25)])):
        with torch.no_grad(), tr.apply(model, method) as h:
            model(**inputs)
        span = image_span(inputs["input_ids"])
        assert [p for p in h.stats.kept_positions[2][0] if p in span] == want
        assert h.stats.visual_tokens_per_layer == [16, 16, 4]


def test_composes_after_flowcut_in_the_tower():
    """FlowCut's whole pipeline: the tower keeps target_num patch tokens, the language model a share of those."""
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad(), tr.apply(model, tr.get_method("flowcut", target_num=8),
                                   tr.get_method("flowcut_llm", keep_ratio=2 / 3, layer=1)) as h:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert h.stats_by_stage["decoder"].visual_tokens_per_layer[-1] == 4


def test_budget_errors_say_what_to_do():
    with pytest.raises(tr.BudgetError, match="give keep_ratio"):
        tr.get_method("flowcut_llm")
    with pytest.raises(tr.BudgetError, match="give layer or schedule"):
        tr.get_method("flowcut_llm", schedule=[(2, 0.5)], layer=1)
    with pytest.raises(tr.BudgetError, match="lowest reachable is 0.667: raise keep_ratio or lower layer"):
        tr.patch(tiny_vlm("llava"), tr.get_method("flowcut_llm", keep_ratio=0.5))
    with pytest.raises(tr.BudgetError, match="layer=3 is beyond"):
        tr.patch(tiny_vlm("llava"), tr.get_method("flowcut_llm", keep_ratio=0.9, layer=3))
