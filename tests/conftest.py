"""Tiny random-initialised models of every supported encoder family (real architectures, small sizes)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

IMAGE, PATCH = 112, 14  # 8 x 8 = 64 patches


def _common(**extra):
    return dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH, **extra)


def tiny(name: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    builders = {
        "vit": lambda: tf.ViTModel(tf.ViTConfig(**_common(intermediate_size=128)), add_pooling_layer=False),
        "vit_cls": lambda: tf.ViTForImageClassification(tf.ViTConfig(**_common(intermediate_size=128, num_labels=5))),
        "deit": lambda: tf.DeiTModel(tf.DeiTConfig(**_common(intermediate_size=128)), add_pooling_layer=False),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**_common(mlp_ratio=2))),
        "dinov2_cls": lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**_common(mlp_ratio=2, num_labels=5))),
        "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_common(intermediate_size=128))),
        "clip_proj": lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**_common(intermediate_size=128, projection_dim=32))),
        "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**_common(intermediate_size=128))),
    }
    model = builders[name]()
    model.config._attn_implementation = attn
    return model.eval()


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def main_output(out) -> torch.Tensor:
    for key in ("logits", "image_embeds", "last_hidden_state"):
        if key in out and out[key] is not None:
            return out[key]
    raise KeyError(list(out.keys()))


FAMILIES = ["vit", "vit_cls", "deit", "dinov2", "dinov2_cls", "clip", "clip_proj", "siglip"]


@pytest.fixture(scope="session")
def real_dinov2():
    from tokenreduce.assets import load_dinov2_small

    return load_dinov2_small()


@pytest.fixture(scope="session")
def photo_pixels():
    from tokenreduce.assets import natural_photos, preprocess

    return preprocess([p for _, p in natural_photos()[:4]])


# ---------------------------------------------------------------------------- missing assets skip, with the reason
def _asset_missing(excinfo) -> bool:
    """An ImportError / FileNotFoundError raised from inside tokenreduce.assets: a model or dataset not installed."""
    if not excinfo.errisinstance((ImportError, FileNotFoundError)):
        return False
    return any("tokenreduce/assets/" in str(entry.path).replace("\\", "/") for entry in excinfo.traceback)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (or fixture) that needs an asset which is not installed is reported as skipped, saying which."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _asset_missing(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: asset not installed: {call.excinfo.value}")


@pytest.fixture
def no_optuna(monkeypatch):
    """Imports of optuna fail, as on a machine without the ``search`` extra."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
