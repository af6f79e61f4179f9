"""ToMe and EViT against plain references written from their papers' reference code."""

import pytest
import torch
from conftest import pixels, tiny
from reference_vit import dinov2_parts, evit_forward, tome_forward, vit_parts

import tokenreduce as tr


@pytest.mark.parametrize("r", [3, 8, 20])
def test_tome_matches_reference_on_dinov2(r):
    model, x = tiny("dinov2"), pixels(3)
    with torch.no_grad():
        emb = model.embeddings(x)
        ref = model.layernorm(tome_forward(model, model.encoder.layer, emb, r, dinov2_parts))
        with tr.apply(model, tr.get_method("tome", r=r)):
            ours = model(x).last_hidden_state
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_tome_keeps_deit_distillation_token_second_like_reference():
    model, x = tiny("deit"), pixels(2)
    with torch.no_grad():
        emb = model.embeddings(x)
        ref = model.layernorm(tome_forward(model, model.layers, emb, 6, vit_parts, distill_token=True))
        with tr.apply(model, tr.get_method("tome", r=6)):
            ours = model(x).last_hidden_state
    assert torch.allclose(ours, ref, atol=1e-5)


def test_tome_without_proportional_attention_differs():
    """prop_attn is not a no-op: switching it off changes the merged model's output."""
    model, x = tiny("dinov2"), pixels(1)
    with torch.no_grad():
        with tr.apply(model, tr.get_method("tome", r=8)):
            a = model(x).last_hidden_state
        with tr.apply(model, tr.get_method("tome", r=8, prop_attn=False)):
            b = model(x).last_hidden_state
    assert not torch.allclose(a, b, atol=1e-4)


def test_tome_inflection_schedule_matches_parse_r():
    from tokenreduce.core.budget import tome_schedule

    # ToMe's parse_r: min_val=int(r*(1-inflect)), max_val=2r-min_val, linear, truncated
    assert tome_schedule(4, (8, -1.0)).removed == (16, 10, 5, 0)
    assert tome_schedule(3, 5).removed == (5, 5, 5)
    assert tome_schedule(4, [3, 2]).removed == (3, 2, 0, 0)


@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
def test_evit_matches_reference_on_vit(keep_rate):
    model, x = tiny("vit"), pixels(3)
    locations = (1, 2, 3)
    with torch.no_grad():
        emb = model.embeddings(x)
        ref = model.layernorm(evit_forward(model.layers, emb, keep_rate, locations, vit_parts))
        with tr.apply(model, tr.get_method("evit", keep_rate=keep_rate, locations=locations)):
            ours = model(x).last_hidden_state
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_evit_count_rounding_matches_reference_on_deit_s_shapes():
    """197 tokens, keep 0.7 at 3/6/9, fused token: 140, 100, 72 (EViT's README numbers)."""
    from tokenreduce.methods.evit import staged_counts

    counts = staged_counts(197, 1, 12, (3, 6, 9), 0.7, extra=1)
    assert [counts[3], counts[6], counts[9]] == [140, 100, 72]
    assert staged_counts(197, 1, 12, (3, 6, 9), 0.7, extra=0)[9] == 69
