"""Tiny random-initialised vision-language models of every VLM family (real architectures, small sizes).

``tiny_vlm(name)`` builds the model; ``vlm_batch(model, name, texts)`` builds a left-padded batch:
sample ``i`` is ``texts[i][0]`` text tokens, one image (its full placeholder sequence, laid out as the
family's processor lays it out), ``texts[i][1]`` text tokens.

Families: "llava", "llava_dinov2", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
"idefics3", "smolvlm", "gemma3".
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers.image_processing_utils import select_best_resolution

VOCAB = 512
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None)
IMAGE_ID = VOCAB - 1  # the image placeholder of every family
VIDEO_ID = VOCAB - 2  # the video placeholder (LLaVA-OneVision, Qwen)
START_ID = VOCAB - 3  # Qwen <|vision_start|>, Gemma 3 <start_of_image>, Idefics3/SmolVLM <fake_token_around_image>
END_ID = VOCAB - 4  # Qwen <|vision_end|>, Gemma 3 <end_of_image>
GLOBAL_ID = VOCAB - 5  # Idefics3/SmolVLM <global-img>
NEWLINES_ID = VOCAB - 6  # Gemma 3 "\n\n" around the image
TEXT_HIGH = VOCAB - 8  # random text ids are in [2, TEXT_HIGH) (the llava families keep [2, VOCAB - 2))

FAMILIES = ("llava", "llava_dinov2", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3",
            "smolvlm", "gemma3")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IDEFICS = ("idefics3", "smolvlm")

ANYRES_IMAGE = (32, 64)  # LLaVA-NeXT / OneVision: the original image's (height, width): base + a 1x2 grid of crops
ANYRES_PINPOINTS = [[32, 32], [32, 64], [64, 32]]
QWEN_GRID = (1, 6, 8)  # Qwen: image_grid_thw of each image (patches of 4 px: a 24x32 image) -> 3x4 = 12 tokens
MROPE = [2, 3, 3]  # Qwen M-RoPE sections (head_dim 16)


def _vision(cls, **kw):
    return cls(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=32, patch_size=8), **kw})


def _qwen_text(cls, **kw):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE}
    return cls(**{**TEXT, "rope_parameters": rope, **kw})


def _config(name: str):
    if name == "llava":
        return tf.LlavaConfig(vision_config=_vision(tf.CLIPVisionConfig), text_config=tf.LlamaConfig(**TEXT),
                              image_token_id=IMAGE_ID, vision_feature_select_strategy="default",
                              vision_feature_layer=-2)
    if name == "llava_dinov2":  # the mini-LLaVA's architecture
        return tf.LlavaConfig(vision_config=_vision(tf.Dinov2Config), text_config=tf.LlamaConfig(**TEXT),
                              image_token_id=IMAGE_ID, vision_feature_select_strategy="default",
                              vision_feature_layer=-2)
    if name == "llava_next":
        return tf.LlavaNextConfig(vision_config=_vision(tf.CLIPVisionConfig), text_config=tf.LlamaConfig(**TEXT),
                                  image_token_id=IMAGE_ID, vision_feature_select_strategy="default",
                                  vision_feature_layer=-2, image_grid_pinpoints=ANYRES_PINPOINTS)
    if name == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=_vision(tf.SiglipVisionConfig, vision_use_head=False),
                                       text_config=tf.Qwen2Config(**TEXT), image_token_id=IMAGE_ID,
                                       video_token_id=VIDEO_ID, vision_feature_select_strategy="full",
                                       vision_feature_layer=-1, image_grid_pinpoints=ANYRES_PINPOINTS)
    qwen_ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                    vision_end_token_id=END_ID)
    qwen_vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if name == "qwen2_vl":
        vision = tf.Qwen2VLVisionConfig(embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2, **qwen_vision)
        return tf.Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(tf.Qwen2VLTextConfig), **qwen_ids)
    if name == "qwen2_5_vl":  # window attention in block 0 (windows of 2x2 merged tokens), full in block 1
        vision = tf.Qwen2_5_VLVisionConfig(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"],
                                           window_size=16, fullatt_block_indexes=[1], **qwen_vision)
        return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(tf.Qwen2_5_VLTextConfig), **qwen_ids)
    if name == "qwen3_vl":  # deepstack features from both tower blocks into language-model layers 0 and 1
        vision = tf.Qwen3VLVisionConfig(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"],
                                        num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **qwen_vision)
        text = _qwen_text(tf.Qwen3VLTextConfig, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE, "mrope_interleaved": True})
        return tf.Qwen3VLConfig(vision_config=vision, text_config=text, **qwen_ids)
    if name in IDEFICS:  # image 32, patch 4: 64 patches, pixel shuffle by 2 -> 16 image tokens
        cls, vcls = ((tf.Idefics3Config, tf.Idefics3VisionConfig) if name == "idefics3"
                     else (tf.SmolVLMConfig, tf.SmolVLMVisionConfig))
        return cls(vision_config=_vision(vcls, num_hidden_layers=2, patch_size=4),
                   text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE_ID, scale_factor=2)
    if name == "gemma3":  # all full attention so that the decoder stages can run
        text = tf.Gemma3TextConfig(**{**TEXT, "head_dim": 16, "query_pre_attn_scalar": 16,
                                      "layer_types": ["full_attention"] * TEXT["num_hidden_layers"]})
        return tf.Gemma3Config(vision_config=_vision(tf.SiglipVisionConfig, num_hidden_layers=2, vision_use_head=False),
                               text_config=text, mm_tokens_per_image=4, image_token_index=IMAGE_ID,
                               boi_token_index=START_ID, eoi_token_index=END_ID)
    raise ValueError(name)


MODELS = {"llava": "LlavaForConditionalGeneration", "llava_dinov2": "LlavaForConditionalGeneration",
          "llava_next": "LlavaNextForConditionalGeneration",
          "llava_onevision": "LlavaOnevisionForConditionalGeneration",
          "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
          "qwen3_vl": "Qwen3VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
          "smolvlm": "SmolVLMForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


def tiny_vlm(name: str = "llava", seed: int = 0, attn: str = "sdpa"):
    if name not in MODELS:
        raise ValueError(name)
    cfg = _config(name)
    torch.manual_seed(seed)
    model = getattr(tf, MODELS[name])(cfg)
    model.config._attn_implementation = attn
    model.config.text_config._attn_implementation = attn
    model.config.vision_config._attn_implementation = attn
    return model.eval()


def _anyres_tokens(config, cls_token: bool) -> int:
    """LLaVA-NeXT / OneVision processor: base features + unpadded crop features + one newline per crop-feature row."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    best_h, best_w = select_best_resolution(ANYRES_IMAGE, config.image_grid_pinpoints)
    unpadded, newlines = tf.LlavaNextProcessor._get_unpadded_features(
        None, *ANYRES_IMAGE, side, side, best_h // v.image_size, best_w // v.image_size)
    base = side * side + (1 if cls_token else 0)
    n = unpadded + newlines + base
    return n - 1 if config.vision_feature_select_strategy == "default" else n


def _n_image(config, name: str) -> int:
    """Image placeholder tokens per image, from the config (what get_image_features returns per image)."""
    if name in ("llava", "llava_dinov2"):
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2
    if name == "llava_next":
        return _anyres_tokens(config, cls_token=True)
    if name == "llava_onevision":
        return _anyres_tokens(config, cls_token=False)
    if name in QWEN:
        t, h, w = QWEN_GRID
        return t * h * w // config.vision_config.spatial_merge_size ** 2
    if name in IDEFICS:
        v = config.vision_config
        return int((v.image_size // v.patch_size) ** 2 / config.scale_factor ** 2)
    if name == "gemma3":
        return config.mm_tokens_per_image
    raise ValueError(name)


def image_tokens(name: str) -> int:
    """Image placeholder tokens per image (LLaVA-NeXT / OneVision: including the newline features)."""
    return _n_image(_config(name), name)


def _placeholder(config, name: str) -> torch.Tensor:
    """One image's full placeholder sequence, as the family's processor lays it out."""
    img = [IMAGE_ID] * _n_image(config, name)
    if name in QWEN:  # <|vision_start|><|image_pad|>*n<|vision_end|>
        seq = [START_ID] + img + [END_ID]
    elif name in IDEFICS:  # a single (unsplit) image: <fake_token_around_image><global-img><image>*n<fake_...>
        seq = [START_ID, GLOBAL_ID] + img + [START_ID]
    elif name == "gemma3":  # "\n\n<start_of_image>" + <image_soft_token>*n + "<end_of_image>\n\n"
        seq = [NEWLINES_ID, START_ID] + img + [END_ID, NEWLINES_ID]
    else:
        seq = img
    return torch.tensor(seq)


def _pixels(config, name: str, n: int, g: torch.Generator) -> dict:
    """The processor's image inputs for ``n`` samples of one image each."""
    if name in ("llava_next", "llava_onevision"):
        best = select_best_resolution(ANYRES_IMAGE, config.image_grid_pinpoints)
        side = config.vision_config.image_size
        crops = 1 + (best[0] // side) * (best[1] // side)  # base image + crops
        return {"pixel_values": torch.randn(n, crops, 3, side, side, generator=g),
                "image_sizes": torch.tensor([list(ANYRES_IMAGE)] * n)}
    if name in QWEN:
        v = config.vision_config
        t, h, w = QWEN_GRID
        dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        return {"pixel_values": torch.randn(n * t * h * w, dim, generator=g),
                "image_grid_thw": torch.tensor([list(QWEN_GRID)] * n)}
    side = config.vision_config.image_size
    if name in IDEFICS:
        return {"pixel_values": torch.randn(n, 1, 3, side, side, generator=g),
                "pixel_attention_mask": torch.ones(n, 1, side, side, dtype=torch.bool)}
    return {"pixel_values": torch.randn(n, 3, side, side, generator=g)}


def vlm_batch(model, name: str, texts: list[tuple[int, int]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    high = VOCAB - 2 if name in ("llava", "llava_dinov2") else TEXT_HIGH
    image = _placeholder(model.config, name)
    rows = []
    for a, b in texts:
        rows.append(torch.cat([torch.randint(2, high, (a,), generator=g), image,
                               torch.randint(2, high, (b,), generator=g)]))
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    batch = {"input_ids": ids, "attention_mask": mask, **_pixels(model.config, name, len(rows), g)}
    if name in QWEN:  # text 0, image 1, video 2 (the processor's mm_token_type_ids, needed for M-RoPE)
        batch["mm_token_type_ids"] = (ids == IMAGE_ID).long() + 2 * (ids == VIDEO_ID).long()
    elif name == "gemma3":  # 1 at image tokens: they attend to each other bidirectionally
        batch["token_type_ids"] = (ids == IMAGE_ID).long()
    return batch


def one(batch: dict, i: int) -> dict:
    """Sample ``i`` of a left-padded batch, without its padding."""
    keep = batch["attention_mask"][i].bool()
    out = {}
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            out[k] = v[i:i + 1, keep]
        elif k == "pixel_values" and "image_grid_thw" in batch:  # Qwen: patches of all images, flattened
            sizes = batch["image_grid_thw"].prod(-1).tolist()
            start = sum(sizes[:i])
            out[k] = v[start:start + sizes[i]]
        else:  # pixel_values, image_sizes, image_grid_thw, pixel_attention_mask: one row per sample
            out[k] = v[i:i + 1]
    return out


class CharTokenizer:
    """A stand-in for SmolLM2's tokenizer: one id per character (none of them the image placeholder), decodable."""

    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [100 + ord(c) % 300 for c in text]

    def batch_decode(self, ids, **kw):
        return ["".join(chr(97 + int(i) % 26) for i in row) for row in ids]


def tiny_minillava(image_size: int = 28, vision_layers: int = 2):
    """``(model, processor)``: a random tiny LLaVA with the mini-LLaVA's layout (a DINOv2 tower, [CLS] + patches,
    select layer -2, ``(image_size / 14)^2`` visual tokens per image) and its processor on `CharTokenizer`, for
    ``bench vlm``'s plumbing on the real tasks' questions and images."""
    from tokenreduce.assets.minillava import IMAGE_TOKEN_ID, MiniLlavaProcessor

    vision = tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                             num_attention_heads=2, image_size=image_size, patch_size=14)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default")).eval()
    return model, MiniLlavaProcessor(CharTokenizer(), image_size=image_size)
