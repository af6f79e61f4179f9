"""The mini-LLaVA asset (processor, checksum, tasks) and the visual-token methods on it, against plain references."""

from __future__ import annotations

import collections
import math
import shutil

import pytest
import torch

import tokenreduce as tr
from tokenreduce.assets import minillava
from tokenreduce.assets.vqa import is_correct, vqa_samples


@pytest.fixture(scope="module")
def vlm():
    return minillava.load_vlm("minillava")


def test_scene_questions_are_balanced_seeded_and_split():
    a, b = vqa_samples("scenes", "train", 80), vqa_samples("scenes", "train", 80)
    assert [s["question"] for s in a] == [s["question"] for s in b]
    test = vqa_samples("scenes", "test", 80)
    assert {s["question"] + str(s["boxes"]) for s in a}.isdisjoint({s["question"] + str(s["boxes"]) for s in test})
    kinds = collections.Counter(s["kind"] for s in a)
    assert set(kinds.values()) == {20}
    yes = [s["answer"] for s in a if s["kind"] == "exists"]
    assert 0.3 < yes.count("yes") / len(yes) < 0.7
    assert a[0]["image"].size == (224, 224)


def test_easyvqa_questions_are_a_third_each_with_yes_equal_to_no():
    s = vqa_samples("easyvqa", "test", 60)
    kinds = collections.Counter(x["kind"] for x in s)
    assert kinds == {"color": 20, "shape": 20, "yesno": 20}
    assert [x["answer"] for x in s if x["kind"] == "yesno"].count("yes") == 10


def test_answers_are_scored_by_their_first_word():
    sample = {"answer": "red"}
    assert is_correct(sample, " Red.") and is_correct(sample, "red circle") and not is_correct(sample, "the red")


def test_processor_lays_out_chat_prompts_with_144_image_tokens_left_padded(vlm):
    _, processor = vlm
    qs = vqa_samples("scenes", "test", 2)
    out = processor(images=[q["image"] for q in qs], text=["Hi?", "A longer question here?"], return_tensors="pt",
                    padding=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert out["pixel_values"].shape == (2, 3, 168, 168)
    assert ((ids == minillava.IMAGE_TOKEN_ID).sum(-1) == 144).all()
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left
    text = processor.tokenizer.decode(ids[1][ids[1] != minillava.IMAGE_TOKEN_ID])
    assert text == "<|im_start|>user\n\nA longer question here?<|im_end|>\n<|im_start|>assistant\n"
    blind = processor(text=["Hi?"])
    assert not (blind["input_ids"] == minillava.IMAGE_TOKEN_ID).any() and "pixel_values" not in blind
    with pytest.raises(ValueError, match="one image per text"):
        processor(images=[qs[0]["image"]], text=["a", "b"])


def test_a_corrupt_projector_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "data" / minillava.PROJECTOR_FILE
    bad.parent.mkdir()
    shutil.copy(minillava.projector_path(), bad)
    shutil.copy(minillava.projector_path().parent / minillava.CARD_FILE, bad.parent / minillava.CARD_FILE)
    with open(bad, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(minillava, "projector_path", lambda: bad)
    with pytest.raises(ValueError, match="SHA-256"):
        minillava.load_vlm("minillava")


def test_fastervlm_on_the_real_model_keeps_the_top_cls_attention_patches(vlm):
    """Plain reference: DINOv2's eager attention map at the select block (10 of 12), [CLS] row, mean over heads."""
    model, processor = vlm
    q = vqa_samples("scenes", "test", 1)[0]
    inputs = processor(images=[q["image"]], text=[q["question"]])
    with torch.no_grad():
        model.model.vision_tower.config._attn_implementation = "eager"
        try:
            attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
        finally:
            model.model.vision_tower.config._attn_implementation = "sdpa"
        want = attn[0, :, 0, 1:].mean(0).topk(14).indices.sort().values
        with tr.apply(model, tr.get_method("fastervlm", keep_count=14)) as h:
            model(**inputs)
    start = int((inputs["input_ids"][0] == minillava.IMAGE_TOKEN_ID).nonzero()[0])
    kept = [p - start for p in h.stats.kept_positions[0] if start <= p < start + 144]
    assert kept == want.tolist()


def test_fastv_on_the_real_model_keeps_what_layer_k_minus_1_last_query_attends(vlm):
    """Plain reference: SmolLM2's eager attention at layer K-1 = 1, last row, mean over its 9 heads (GQA 3 KV)."""
    model, processor = vlm
    q = vqa_samples("easyvqa", "test", 1)[0]
    inputs = processor(images=[q["image"]], text=[q["question"]])
    lm = model.model.language_model
    with torch.no_grad():
        lm.config._attn_implementation = "eager"
        try:
            attn = model(**inputs, output_attentions=True).attentions[1]
        finally:
            lm.config._attn_implementation = "sdpa"
        start = int((inputs["input_ids"][0] == minillava.IMAGE_TOKEN_ID).nonzero()[0])
        row = attn[0, :, -1].mean(0)[start:start + 144]
        want = (row.topk(math.floor(144 * 0.25)).indices.sort().values + start).tolist()
        with tr.apply(model, tr.get_method("fastv", k=2, r=0.75)) as h:
            model(**inputs)
    assert [p for p in h.stats.kept_positions[2][0] if start <= p < start + 144] == want
