"""Natural photographs that ship with installed packages (no download).

Why: token-reduction methods behave differently on real photos than on random
tensors (redundant sky, textured fur, ...). scikit-image bundles a handful of
colour photos inside its wheel, and matplotlib ships ``grace_hopper.jpg``; both
load offline. Datasets that scikit-image would fetch with ``pooch`` (brain,
eagle, lily, skin, ...) are deliberately not used.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

__all__ = ["natural_photos", "PHOTO_NAMES"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _skimage_motorcycle() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(filename) as fh:
            return np.asarray(Image.open(fh).convert("RGB"))

    return load


# Fixed order => deterministic output. All are RGB colour photographs bundled
# in the package wheels (scikit-image 0.26 / matplotlib 3.x).
_SOURCES: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("astronaut", _skimage("astronaut")),  # portrait, 512x512
    ("chelsea", _skimage("chelsea")),  # cat, 300x451
    ("coffee", _skimage("coffee")),  # cup on table, 400x600
    ("rocket", _skimage("rocket")),  # launch pad, 427x640
    ("motorcycle", _skimage_motorcycle),  # indoor scene, 500x741
    ("hubble_deep_field", _skimage("hubble_deep_field")),  # sky, 872x1000
    ("immunohistochemistry", _skimage("immunohistochemistry")),  # microscopy, 512x512
    ("retina", _skimage("retina")),  # fundus photo, 1411x1411
    ("grace_hopper", _matplotlib("grace_hopper.jpg")),  # portrait, 600x512
)

PHOTO_NAMES: tuple[str, ...] = tuple(name for name, _ in _SOURCES)


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 photo, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB photo, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[tuple[str, np.ndarray], ...]:
    photos = []
    for name, load in _SOURCES:
        try:
            img = load()
        except (ImportError, OSError, ValueError):
            # package missing, or (in another scikit-image version) the file is
            # no longer bundled and would need a download: skip it.
            continue
        arr = _as_rgb_uint8(img)
        arr.setflags(write=False)
        photos.append((name, arr))
    return tuple(photos)


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """``[(name, HxWx3 uint8 RGB array), ...]`` in a fixed order.

    Only photos that load without network access are returned (currently 9:
    ``PHOTO_NAMES``). Arrays are cached and read-only; copy before editing.
    """
    photos = list(_load_all())
    if len(photos) < 6:
        raise RuntimeError(
            f"only {len(photos)} bundled photos could be loaded ({[n for n, _ in photos]}); "
            "check that scikit-image and matplotlib are installed"
        )
    return photos
