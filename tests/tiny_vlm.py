"""Tiny random-initialised vision-language models of every VLM family (real architectures, small sizes).

``tiny_vlm(name)`` builds the model; ``vlm_batch(model, name, texts)`` builds a left-padded batch:
sample ``i`` is ``texts[i][0]`` text tokens, one image, ``texts[i][1]`` text tokens.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 512
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None)
IMAGE_ID = VOCAB - 1


def tiny_vlm(name: str = "llava", seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if name == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=8)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE_ID,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
        model = tf.LlavaForConditionalGeneration(cfg)
    elif name == "llava_dinov2":  # the mini-LLaVA's architecture
        vision = tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=32, patch_size=8)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE_ID,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
        model = tf.LlavaForConditionalGeneration(cfg)
    else:
        raise ValueError(name)
    model.config._attn_implementation = attn
    model.config.text_config._attn_implementation = attn
    model.config.vision_config._attn_implementation = attn
    return model.eval()


def image_tokens(name: str) -> int:
    return {"llava": 16, "llava_dinov2": 16}[name]


def vlm_batch(model, name: str, texts: list[tuple[int, int]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens(name)
    rows = []
    for a, b in texts:
        rows.append(torch.cat([torch.randint(2, VOCAB - 2, (a,), generator=g), torch.full((n_img,), IMAGE_ID),
                               torch.randint(2, VOCAB - 2, (b,), generator=g)]))
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    pixels = torch.randn(len(rows), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def one(batch: dict, i: int) -> dict:
    """Sample ``i`` of a left-padded batch, without its padding."""
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "pixel_values": batch["pixel_values"][i:i + 1]}
