"""Large-scene VQA for coarse-to-fine pruning of big images: one easy-vqa object in one tile of a G x G canvas.

A sample's canvas has ``G x G`` tiles of ``TILE`` = 224 px (G = 2 or 3, so 448 or 672 px); exactly one tile,
``tile`` (row-major index ``row * G + col``), holds an easy-vqa image (its 64 px picture upscaled to the tile,
the model's best-answered task); every other tile is the same light background (``background="plain"``), or
that background with a faint low-frequency texture over the whole canvas (``"texture"``: no shapes, no edges).
The question is the easy-vqa question about that object (colour / shape / yes-no, a third each, yes = no), so
the answer is in one tile, and a method that looks at a coarse view and picks tiles can find it with the text.

``split`` works as in `tokenreduce.assets.vqa`: ``"test"`` draws easy-vqa's held-out test images, ``"train"``
and ``"calib"`` its training images with different seeds; the same arguments give the same samples.

A sample is a dict: ``image`` (the canvas, PIL RGB), ``question``, ``answer``, ``kind`` (``color`` / ``shape``
/ ``yesno``), ``grid`` (G), ``tile`` (the answer tile's index), ``tile_box`` (its ``(x0, y0, x1, y1)`` in
canvas pixels), ``source`` (easy-vqa image id).

How the mini-LLaVA sees it (``large_scene_prompt``, forms measured by ``tools/large_scene_probe.py``):

- ``"multi"``: the coarse view (the canvas squashed to one image) then the G*G tiles, 1 + G*G images;
- ``"tiles"``: the G*G tiles only; ``"coarse"``: the coarse view only;
- ``"answer_tile"``: only the answer tile (an oracle: the easy-vqa question on its own image);
- ``"focus"``: the coarse view then the answer tile, what a coarse-to-fine method that picks the right tile
  hands the language model (an oracle of region selection).

Each image is ``processor.num_image_tokens`` visual tokens (144 for the mini-LLaVA), so ``"multi"`` is
720 visual tokens at G = 2 and 1,440 at G = 3.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from .vqa import _SPLIT_SEED, _check_split, _easyvqa_kind, _easyvqa_module

TILE = 224
GRIDS = (2, 3)
FORMS = ("multi", "tiles", "coarse", "answer_tile", "focus")
BACKGROUNDS = ("plain", "texture")


def large_scene_samples(
    split: str, n: int, seed: int = 0, grid: int | Sequence[int] = GRIDS, background: str = "plain"
) -> list[dict[str, Any]]:
    """``n`` large-scene questions; ``grid`` is one G or the Gs drawn from (per sample, seeded)."""
    from PIL import Image

    _check_split(split)
    grids = (grid,) if isinstance(grid, int) else tuple(grid)
    if not grids or any(not isinstance(g, int) or g < 1 for g in grids):
        raise ValueError(f"grid must be a positive int or a sequence of them, got {grid!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    ev = _easyvqa_module()
    if split == "test":
        questions, answers, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    else:
        questions, answers, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    pools: dict[str, list[int]] = {"color": [], "shape": [], "yes": [], "no": []}
    for i, (q, a) in enumerate(zip(questions, answers)):
        kind = _easyvqa_kind(q, a)
        pools[a if kind == "yesno" else kind].append(i)
    # its own stream, apart from vqa.easyvqa_samples' (the same seed must not give the same questions)
    rng = random.Random(f"large_scene/{split}/{seed + _SPLIT_SEED[split]}")
    for pool in pools.values():
        rng.shuffle(pool)
    order = ("color", "shape", "yes", "color", "shape", "no")
    used = dict.fromkeys(pools, 0)
    out = []
    for k in range(n):
        name = order[k % 6]
        i = pools[name][used[name] % len(pools[name])]  # every question of a pool once before any twice
        used[name] += 1
        g = grids[rng.randrange(len(grids))]
        tile = rng.randrange(g * g)
        with Image.open(paths[ids[i]]) as im:
            obj = im.convert("RGB")
        texture = random.Random(f"large_scene/texture/{split}/{seed}/{k}")  # the same questions and tiles either way
        canvas = _canvas(obj, g, tile, background, texture)
        row, col = divmod(tile, g)
        out.append({
            "image": canvas,
            "question": questions[i][0].upper() + questions[i][1:],
            "answer": answers[i],
            "kind": _easyvqa_kind(questions[i], answers[i]),
            "grid": g,
            "tile": tile,
            "tile_box": (col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE),
            "source": int(ids[i]),
        })
    return out


def _background_colour(obj) -> tuple[int, int, int]:
    """The easy-vqa image's background: its most frequent colour (a light pastel, each channel 230-255)."""
    counts = obj.getcolors(obj.width * obj.height)
    return max(counts)[1]


def _canvas(obj, g: int, tile: int, background: str, rng: random.Random):
    import numpy as np
    from PIL import Image

    bg = _background_colour(obj)
    big = obj.resize((TILE, TILE), Image.Resampling.BICUBIC)
    size = g * TILE
    if background == "plain":
        canvas = Image.new("RGB", (size, size), bg)
        row, col = divmod(tile, g)
        canvas.paste(big, (col * TILE, row * TILE))
        return canvas
    # texture: the background plus a smooth field of +-10 levels (a 4 x 4 random grid per tile, upsampled),
    # over the whole canvas, the answer tile's background pixels included, so no tile stands out by texture
    field = np.asarray(
        Image.fromarray(np.array([[rng.uniform(0, 255) for _ in range(4 * g)] for _ in range(4 * g)], dtype=np.float32))
        .resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    shade = (field / 255.0 - 0.5) * 20.0
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(bg, dtype=np.float32) + shade[..., None]
    row, col = divmod(tile, g)
    window = canvas[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
    tile_px = np.asarray(big, dtype=np.float32)
    is_object = np.abs(tile_px - np.asarray(bg, dtype=np.float32)).max(-1) > 6  # the shape and its edge
    window[is_object] = tile_px[is_object]
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))


def tiles(sample: dict[str, Any]) -> list:
    """The sample's G*G tiles (PIL, ``TILE`` px each), row-major."""
    g, image = sample["grid"], sample["image"]
    return [image.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)) for r in range(g) for c in range(g)]


def form_images(sample: dict[str, Any], form: str = "multi") -> list:
    """The images of one sample in the order of their placeholders (the coarse view is the whole canvas; the
    processor squashes it to its image size)."""
    if form == "multi":
        return [sample["image"], *tiles(sample)]
    if form == "tiles":
        return tiles(sample)
    if form == "coarse":
        return [sample["image"]]
    if form == "answer_tile":
        return [tiles(sample)[sample["tile"]]]
    if form == "focus":
        return [sample["image"], tiles(sample)[sample["tile"]]]
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")


def large_scene_prompt(processor, samples: Sequence[dict[str, Any]], form: str = "multi", labels: bool = False):
    """Model inputs (``input_ids``, ``attention_mask``, ``pixel_values``) for a batch of samples in ``form``.

    Each sample is one ChatML user turn (``processor.prompt``) with one ``<image>`` placeholder per image of
    `form_images`, one per line, then the question; each placeholder is expanded to the processor's
    ``num_image_tokens``; rows are left-padded. ``pixel_values`` stacks every sample's images in order,
    as ``LlavaForConditionalGeneration`` scatters them into the placeholders. ``labels=True`` puts a short
    line before each image ("Overview:", "Tile 1 (row 1, column 1):", ...).
    """
    import torch
    from transformers import BatchFeature

    rows, images = [], []
    for s in samples:
        imgs = form_images(s, form)
        images += imgs
        rows.append(processor._ids(processor.prompt(_prompt_text(s, form, labels, processor.image_token), True)))
    width = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    return BatchFeature({
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": processor.pixel_values(images),
    })


def _prompt_text(sample: dict[str, Any], form: str, labels: bool, image_token: str) -> str:
    g = sample["grid"]
    names: list[str] = []
    if form in ("multi", "coarse", "focus"):
        names.append("Overview:")
    if form in ("multi", "tiles"):
        names += [f"Tile {k + 1} (row {k // g + 1}, column {k % g + 1}):" for k in range(g * g)]
    if form in ("answer_tile", "focus"):
        names.append(f"Tile {sample['tile'] + 1} (row {sample['tile'] // g + 1}, column {sample['tile'] % g + 1}):")
    lines = [f"{name} {image_token}" if labels else image_token for name in names]
    return "\n".join(lines) + "\n" + sample["question"]
