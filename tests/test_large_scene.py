"""The large-scene task (`tokenreduce.assets.large_scene`): seeded canvases, the answer tile, the multi-image prompt."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import transformers as tf

from tiny_vlm import CharTokenizer

from tokenreduce.assets import large_scene as ls
from tokenreduce.assets.minillava import IMAGE_TOKEN_ID, MiniLlavaProcessor


def _processor(image_size=28):  # 28 px / 14 = 2 x 2 = 4 visual tokens per image
    return MiniLlavaProcessor(CharTokenizer(), image_size=image_size)


def _far_from_background(tile, bg, tol):
    a = np.asarray(tile, dtype=np.int16)
    return (np.abs(a - np.asarray(bg, dtype=np.int16)).max(-1) > tol).sum()


def test_same_arguments_same_samples_and_splits_differ():
    a, b = ls.large_scene_samples("test", 12), ls.large_scene_samples("test", 12)
    assert [(s["question"], s["tile"], s["grid"]) for s in a] == [(s["question"], s["tile"], s["grid"]) for s in b]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    train, calib = ls.large_scene_samples("train", 12), ls.large_scene_samples("calib", 12)
    key = lambda s: (s["question"], s["source"])  # noqa: E731
    assert {key(s) for s in train}.isdisjoint({key(s) for s in calib})
    assert [key(s) for s in a] != [key(s) for s in train]
    assert [key(s) for s in ls.large_scene_samples("test", 12, seed=1)] != [key(s) for s in a]


def test_kinds_a_third_each_yes_equal_no_no_repeats_and_both_grids():
    s = ls.large_scene_samples("test", 60)
    assert collections.Counter(x["kind"] for x in s) == {"color": 20, "shape": 20, "yesno": 20}
    assert [x["answer"] for x in s if x["kind"] == "yesno"].count("yes") == 10
    assert len({(x["question"], x["source"]) for x in s}) == 60
    assert {x["grid"] for x in s} == {2, 3}
    # one grid: the same questions, only the layout changes
    g2, g3 = ls.large_scene_samples("test", 12, grid=2), ls.large_scene_samples("test", 12, grid=3)
    assert [x["question"] for x in g2] == [x["question"] for x in g3]
    assert {x["grid"] for x in g2} == {2} and {x["grid"] for x in g3} == {3}
    textured = ls.large_scene_samples("test", 12, grid=3, background="texture")
    assert [(x["question"], x["tile"]) for x in textured] == [(x["question"], x["tile"]) for x in g3]


@pytest.mark.parametrize("background", ls.BACKGROUNDS)
def test_the_object_is_in_the_recorded_tile_only(background):
    for s in ls.large_scene_samples("test", 12, grid=(2, 3), background=background):
        g = s["grid"]
        assert s["image"].size == (g * ls.TILE, g * ls.TILE)
        tiles = ls.tiles(s)
        assert len(tiles) == g * g and all(t.size == (ls.TILE, ls.TILE) for t in tiles)
        row, col = divmod(s["tile"], g)
        assert s["tile_box"] == (col * 224, row * 224, col * 224 + 224, row * 224 + 224)
        assert tiles[s["tile"]].tobytes() == s["image"].crop(s["tile_box"]).tobytes()
        bg = ls._background_colour(tiles[(s["tile"] + 1) % (g * g)]) if background == "plain" else None
        for k, t in enumerate(tiles):
            ref = bg if bg is not None else np.asarray(t).reshape(-1, 3).mean(0)
            far = _far_from_background(t, ref, 22 if background == "texture" else 0)
            if k == s["tile"]:
                assert far > 100, (k, far)  # the shape
            else:
                assert far == 0, (k, far)  # only the background (and the faint texture)


def test_forms_give_their_images_and_placeholders():
    proc = _processor()
    s = ls.large_scene_samples("test", 2, grid=3)
    for form, count in (("multi", 10), ("tiles", 9), ("coarse", 1), ("answer_tile", 1), ("focus", 2)):
        images = ls.form_images(s[0], form)
        assert len(images) == count
        inputs = ls.large_scene_prompt(proc, s, form)
        assert inputs["pixel_values"].shape == (2 * count, 3, 28, 28)
        assert ((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1) == count * proc.num_image_tokens).all()
    assert ls.form_images(s[0], "coarse")[0] is s[0]["image"]
    assert ls.form_images(s[0], "answer_tile")[0].tobytes() == s[0]["image"].crop(s[0]["tile_box"]).tobytes()
    focus = ls.form_images(s[0], "focus")
    assert focus[0] is s[0]["image"] and focus[1].tobytes() == s[0]["image"].crop(s[0]["tile_box"]).tobytes()
    with pytest.raises(ValueError, match="form must be one of"):
        ls.form_images(s[0], "all")
    text = ls._prompt_text(s[0], "multi", True, "<image>")
    assert text.startswith("Overview: <image>\nTile 1 (row 1, column 1): <image>\n")
    assert "Tile 9 (row 3, column 3): <image>\n" + s[0]["question"] in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ls.large_scene_samples("dev", 2)
    with pytest.raises(ValueError, match="grid"):
        ls.large_scene_samples("test", 2, grid=0)
    with pytest.raises(ValueError, match="background"):
        ls.large_scene_samples("test", 2, background="noise")


def test_a_llava_reads_each_samples_images_in_order():
    """A tiny Llava with the mini-LLaVA's layout: a batch of two multi-image prompts of equal length gives each row
    the logits of that sample alone (pixel_values are laid out sample by sample, image by image)."""
    vision = tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=14)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default")).eval()
    proc = _processor()
    a, b = ls.large_scene_samples("test", 2, grid=2)
    b = dict(b, question=a["question"])  # equal lengths: no padding
    with torch.no_grad():
        both = model(**ls.large_scene_prompt(proc, [a, b], "multi")).logits[:, -1]
        alone = model(**ls.large_scene_prompt(proc, [b], "multi")).logits[:, -1]
        swapped = model(**ls.large_scene_prompt(proc, [b, a], "multi")).logits[:, -1]
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(swapped[0:1], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both[0], both[1])
