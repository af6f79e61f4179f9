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


@pytest.mark.parametrize("file", [minillava.PROJECTOR_FILE, minillava.LORA_FILE])
def test_corrupt_weights_are_refused(tmp_path, monkeypatch, file):
    data = tmp_path / "data"
    data.mkdir()
    for name in (minillava.PROJECTOR_FILE, minillava.LORA_FILE, minillava.CARD_FILE):
        if (minillava.projector_path().parent / name).is_file():
            shutil.copy(minillava.projector_path().parent / name, data / name)
    if not (data / file).is_file():
        pytest.skip(f"{file} is not shipped (the training record lists no LoRA)")
    with open(data / file, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(minillava, "projector_path", lambda: data / minillava.PROJECTOR_FILE)
    with pytest.raises(ValueError, match="SHA-256"):
        minillava.load_vlm("minillava")


def test_the_lora_is_merged_into_smollm2_attention(vlm):
    """Each adapted projection is SmolLM2's weight plus alpha/rank * B A; the others are SmolLM2's own."""
    from safetensors.torch import load_file

    from tokenreduce.assets.llm import load_smollm2

    record = minillava.projector_record()
    if "lora" not in record:
        pytest.skip("the training record lists no LoRA")
    model, _ = vlm
    base, _ = load_smollm2()
    lora = load_file(minillava.projector_path().parent / minillava.LORA_FILE)
    scale = record["lora"]["alpha"] / record["lora"]["rank"]
    for i in (0, len(base.model.layers) - 1):
        ours, theirs = model.model.language_model.layers[i], base.model.layers[i]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want = getattr(theirs.self_attn, name).weight
            if name in record["lora"]["targets"]:
                key = f"layers.{i}.self_attn.{name}"
                want = want + scale * lora[key + ".lora_B"] @ lora[key + ".lora_A"]
            torch.testing.assert_close(getattr(ours.self_attn, name).weight, want)
        torch.testing.assert_close(ours.mlp.up_proj.weight, theirs.mlp.up_proj.weight, rtol=0, atol=0)


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
