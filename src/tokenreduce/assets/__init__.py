"""Offline assets: DINOv2 ViT-S/14 weights, bundled photos, Fashion-MNIST.

Everything here works without a model hub or internet access.
"""

from .dinov2 import (
    DINOV2_INPUT_SIZE,
    DINOV2_MEAN,
    DINOV2_STD,
    load_dinov2_small,
    onnx_backbone_features,
    preprocess,
)
from .fashion_mnist import FASHION_MNIST_CLASSES, fashion_to_pixels, load_fashion_mnist
from .images import natural_photos

# LLM assets load lazily: their modules import nothing optional at import time,
# but keep `import tokenreduce.assets` free of transformers' LLM code paths.
_LAZY = {
    "load_smollm2": "llm",
    "load_gemma3_270m": "llm",
    "essays": "haystack",
    "needle_samples": "haystack",
    "multikey_samples": "haystack",
    "multivalue_samples": "haystack",
    "variable_tracking_samples": "haystack",
    "score": "haystack",
    "chat_prompt": "haystack",
    "encode_prompt": "haystack",
    "save_samples": "haystack",
    "load_samples": "haystack",
    "load_vlm": "minillava",
    "build_minillava": "minillava",
    "vqa_samples": "vqa",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DINOV2_INPUT_SIZE",
    "DINOV2_MEAN",
    "DINOV2_STD",
    "FASHION_MNIST_CLASSES",
    "fashion_to_pixels",
    "load_dinov2_small",
    "load_fashion_mnist",
    "natural_photos",
    "onnx_backbone_features",
    "preprocess",
    *_LAZY,
]
