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
]
