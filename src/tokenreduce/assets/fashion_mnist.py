"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download).

Why: a labelled image set is needed for accuracy-vs-speed curves (e.g. k-NN or
linear probes on frozen DINOv2 features), and the project may not fetch data
from the internet. Debian ships Fashion-MNIST as gzipped IDX files under
``/usr/share/datasets/fashion-mnist``; ``make data`` unpacks the same .deb into
``<repo>/.cache/deb`` without root.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .dinov2 import DINOV2_MEAN, DINOV2_STD

__all__ = [
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_dir",
    "fashion_to_pixels",
    "load_fashion_mnist",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "TOKENREDUCE_FASHION_MNIST"
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_LOCAL_SUBDIR = Path(".cache/deb/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def _candidate_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(_SYSTEM_DIR)
    dirs.append(Path.cwd() / _LOCAL_SUBDIR)
    if _CHECKOUT_DIR / _LOCAL_SUBDIR not in dirs:
        dirs.append(_CHECKOUT_DIR / _LOCAL_SUBDIR)
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            return path
    return None


_CHECKOUT_DIR = Path(__file__).resolve().parents[3]  # src/tokenreduce/assets -> the repo (editable install)


def fashion_mnist_dir() -> Path:
    """First directory holding the four IDX files (gzipped or not).

    Searched in order: ``$TOKENREDUCE_FASHION_MNIST``,
    ``/usr/share/datasets/fashion-mnist``,
    ``<cwd>/.cache/deb/usr/share/datasets/fashion-mnist`` and the same under the source
    checkout (where ``make data`` unpacks it), so the CLI works from any directory.
    """
    searched = _candidate_dirs()
    for directory in searched:
        if all(
            _find_file(directory, stem) is not None
            for images, labels, _ in _FILES.values()
            for stem in (images, labels)
        ):
            return directory
    listing = "\n  ".join(str(d) for d in searched)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) not found. Searched:\n  "
        f"{listing}\n"
        "Run `make data` in the repository root (unpacks the Debian package "
        "dataset-fashion-mnist into .cache/deb), or `sudo apt-get install "
        f"dataset-fashion-mnist`, or point ${ENV_VAR} at a directory with the files."
    )


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    if ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, found {ndim}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset != count:
        raise ValueError(f"{path}: truncated or corrupt (header says shape {shape})")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=2)
def _load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem, n = _FILES[split]
    images = _read_idx(_find_file(Path(directory), images_stem), 3)
    labels = _read_idx(_find_file(Path(directory), labels_stem), 1)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(
            f"Fashion-MNIST {split}: unexpected shapes {images.shape} / {labels.shape} in {directory}"
        )
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    return images, labels


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` in {"train", "test"}.

    N is 60000 for "train" and 10000 for "test". Files are parsed once per
    process; each call returns fresh tensors.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load_split(str(fashion_mnist_dir()), split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_to_pixels(images: torch.Tensor | np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 3, size, size]`` ready for DINOv2.

    Bilinear upsampling (``align_corners=False``), gray replicated to 3
    channels, then normalised with ``DINOV2_MEAN`` / ``DINOV2_STD``. Memory is
    ``N * 3 * size**2 * 4`` bytes (600 KB per image at 224), so convert in
    batches.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected images of shape [N, H, W], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    x = x.to(torch.float32).div_(255.0).unsqueeze(1)
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(DINOV2_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(DINOV2_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
