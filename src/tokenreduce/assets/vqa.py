"""Visual question answering data for the mini-LLaVA: easy-vqa and generated multi-object scenes.

Both tasks are seeded and balanced per question type, so that a model which does not look at the
image answers at about chance (the "blind" row of ``tokenreduce bench vlm``):

- ``easyvqa``: the ``easy-vqa`` package (one shape on a 64 px image; install with
  ``pip install --no-deps easy-vqa==1.0``), one third colour questions, one third shape questions,
  one third yes/no questions with as many yes as no. ``split="train"`` draws from the package's
  training images, ``"test"`` from its held-out test images.
- ``scenes``: 2-4 objects (distinct shapes, distinct colours) on a grey 224 px canvas; the answer
  depends on one object among the others: the colour of the named shape, the shape of the named
  colour, whether a colour-shape pair is there (the negatives pair a present colour with a present
  shape), and which side the named shape is on. ``split`` picks disjoint seeds.

A sample is a dict: ``image`` (PIL RGB), ``question``, ``answer`` (one lower-case word),
``kind`` (question type) and, for scenes, ``boxes`` (``[(shape, colour, x0, y0, x1, y1)]`` in
pixels) so pictures of kept tokens can show where the objects are.
"""

from __future__ import annotations

import math
import random
from typing import Any

TASKS = ("easyvqa", "scenes")
SCENE_SIZE = 224
SCENE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SCENE_SHAPES = ("circle", "square", "triangle", "star")
_BACKGROUND = (128, 128, 128)
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "calib": 2_000_003}


def vqa_samples(task: str, split: str, n: int, seed: int = 0, **options) -> list[dict[str, Any]]:
    """``n`` samples of ``task`` (``"easyvqa"`` or ``"scenes"``) from ``split``."""
    if task == "easyvqa":
        return easyvqa_samples(split, n, seed)
    if task != "scenes":
        raise ValueError(f"unknown VQA task {task!r}; choose one of {', '.join(TASKS)}")
    return scene_samples(split, n, seed, **options)


samples = vqa_samples


def _check_split(split: str) -> None:
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_SEED)}, got {split!r}")


# ---------------------------------------------------------------- easy-vqa
def _easyvqa_module():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the easyvqa task needs the easy-vqa package: pip install --no-deps easy-vqa==1.0"
        ) from e
    return easy_vqa


def _easyvqa_kind(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yesno"
    return "shape" if answer in ("circle", "rectangle", "triangle") else "color"


def easyvqa_samples(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Balanced easy-vqa questions: colour / shape / yes-no in equal thirds, yes and no equal."""
    from PIL import Image

    _check_split(split)
    ev = _easyvqa_module()
    if split == "test":
        questions, answers, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    else:  # train and calib both draw from the training images, with different seeds
        questions, answers, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    pools: dict[str, list[int]] = {"color": [], "shape": [], "yes": [], "no": []}
    for i, (q, a) in enumerate(zip(questions, answers)):
        kind = _easyvqa_kind(q, a)
        pools[a if kind == "yesno" else kind].append(i)
    rng = random.Random(seed + _SPLIT_SEED[split])
    for pool in pools.values():
        rng.shuffle(pool)
    order = ["color", "shape", "yes", "color", "shape", "no"]
    picked = [pools[order[k % 6]][k // 6] for k in range(n)]
    out = []
    for i in picked:
        with Image.open(paths[ids[i]]) as im:
            image = im.convert("RGB")
        out.append(
            {
                "image": image,
                "question": questions[i][0].upper() + questions[i][1:],
                "answer": answers[i],
                "kind": _easyvqa_kind(questions[i], answers[i]),
            }
        )
    return out


# ---------------------------------------------------------------- scenes
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None


def _draw_scene(objects: list[tuple[str, str, float, float, float]], size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, colour, cx, cy, r in objects:
        fill = SCENE_COLORS[colour]
        poly = _shape_polygon(shape, cx, cy, r)
        if poly is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return image


def _place(rng: random.Random, count: int, size: int) -> list[tuple[float, float, float]]:
    """Non-overlapping circles (centre, radius) inside the canvas."""
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = rng.uniform(0.08, 0.12) * size
            cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all(math.hypot(cx - x, cy - y) > r + q + 6 for x, y, q in placed):
                placed.append((cx, cy, r))
                if len(placed) == count:
                    return placed


def _scene_question(rng: random.Random, kind: str, objects, size: int, target: int = 0):
    shape, colour, cx, _, _ = objects[target]  # objects are shuffled: the first one is the default target
    if kind == "color":
        return f"What color is the {shape}?", colour
    if kind == "shape":
        return f"What shape is the {colour} object?", shape
    if kind == "side":
        if abs(cx - size / 2) < 0.1 * size:
            return None
        return f"Is the {shape} on the left or on the right?", "left" if cx < size / 2 else "right"
    # exists: yes pairs the target's colour and shape; no pairs a present colour with another present shape
    if rng.random() < 0.5:
        return f"Is there a {colour} {shape}?", "yes"
    if len(objects) > 1:
        other_shape = objects[(target + 1) % len(objects)][0]
    else:
        other_shape = rng.choice([s for s in SCENE_SHAPES if s != shape])
    return f"Is there a {colour} {other_shape}?", "no"


def scene_samples(
    split: str, n: int, seed: int = 0, min_objects: int = 2, max_objects: int = 4, size: int = SCENE_SIZE
) -> list[dict[str, Any]]:
    """Multi-object scenes; question kinds cycle colour, shape, exists, side."""
    _check_split(split)
    if not 1 <= min_objects <= max_objects <= len(SCENE_SHAPES):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SCENE_SHAPES)}")
    rng = random.Random(seed + _SPLIT_SEED[split])
    kinds = ("color", "shape", "exists", "side")
    out = []
    while len(out) < n:
        count = rng.randint(min_objects, max_objects)
        shapes = rng.sample(SCENE_SHAPES, count)
        colours = rng.sample(list(SCENE_COLORS), count)
        objects = [(s, c, cx, cy, r) for s, c, (cx, cy, r) in zip(shapes, colours, _place(rng, count, size))]
        qa = _scene_question(rng, kinds[len(out) % 4], objects, size)
        if qa is None:
            continue
        out.append(
            {
                "image": _draw_scene(objects, size),
                "question": qa[0],
                "answer": qa[1],
                "kind": kinds[len(out) % 4],
                "boxes": [(s, c, cx - r, cy - r, cx + r, cy + r) for s, c, cx, cy, r in objects],
            }
        )
    return out


def scene_turns(sample: dict[str, Any], rng: random.Random, size: int = SCENE_SIZE) -> list[tuple[str, str]]:
    """One question of a random kind about each object of a scene sample, in random order (for training
    on multi-turn conversations; the same templates and answers as the single questions)."""
    objects = [(s, c, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2) for s, c, x0, y0, x1, y1 in sample["boxes"]]
    turns = []
    for target in rng.sample(range(len(objects)), len(objects)):
        qa = _scene_question(rng, rng.choice(("color", "shape", "exists", "side")), objects, size, target)
        if qa is not None:
            turns.append(qa)
    return turns


def is_correct(sample: dict[str, Any], generated: str) -> bool:
    """The first word of the generated answer, lower-cased and stripped of punctuation, equals the answer."""
    words = generated.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == sample["answer"]
