"""mini-LLaVA: a small real LLaVA-1.5-style VLM built from the offline assets, with weights trained here.

``LlavaForConditionalGeneration`` = DINOv2-S/14 (``load_dinov2_small``, frozen, 168 px -> 12x12 = 144
visual tokens from the second-to-last block, [CLS] dropped as LLaVA-1.5's "default" strategy does)
+ SmolLM2-135M-Instruct (``load_smollm2``) + a 2-layer MLP projector (384 -> 576 -> 576, GELU). The
projector and a rank-8 LoRA on SmolLM2's attention projections are trained by
``tools/train_minillava.py`` on the tasks of ``tokenreduce.assets.vqa``; both ship in ``assets/data/``,
are checked against their SHA-256 on load, and the LoRA is merged into the weights. The model card is
``docs/minillava.md``.

The image placeholder is SmolLM2's unused special token ``<empty_output>`` (id 16), so the
vocabulary and the tied embeddings stay exactly SmolLM2's.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .dinov2 import _sha256

IMAGE_TOKEN_ID = 16  # SmolLM2's "<empty_output>": a special token chat text never contains
IMAGE_SIZE = 168
PATCH = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
PROJECTOR_FILE = "minillava_projector.safetensors"
LORA_FILE = "minillava_lora.safetensors"  # low-rank deltas of SmolLM2's attention projections, merged on load
CARD_FILE = "minillava_projector.json"  # checksum and training record, written by the training script


def projector_path() -> Path:
    return Path(str(resources.files("tokenreduce.assets") / "data" / PROJECTOR_FILE))


def projector_record() -> dict[str, Any]:
    """The training record saved next to the weights (sha256, data, accuracy)."""
    return json.loads((projector_path().parent / CARD_FILE).read_text())


def build_minillava(attn_implementation: str = "sdpa", cache_dir: str | Path | None = None):
    """The LLaVA with DINOv2 + SmolLM2 weights and a freshly initialised projector (for training)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from .dinov2 import _quiet_transformers, load_dinov2_small
    from .llm import load_smollm2

    tower = load_dinov2_small(cache_dir=cache_dir, attn_implementation=attn_implementation)
    lm, tokenizer = load_smollm2(cache_dir=cache_dir, attn_implementation=attn_implementation)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    with _quiet_transformers():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model.eval(), MiniLlavaProcessor(tokenizer)


def load_vlm(name: str = "minillava", attn_implementation: str = "sdpa", cache_dir: str | Path | None = None):
    """``(model, processor)`` of a bundled VLM; today only ``"minillava"``.

    The trained projector is loaded and, when the training record lists a LoRA, its low-rank deltas
    are merged into SmolLM2's attention projections (``W + alpha/rank * B A``), so the model is a plain
    ``LlavaForConditionalGeneration``. Raises FileNotFoundError if a weights file is missing and
    ValueError if one does not match its recorded SHA-256.
    """
    if name != "minillava":
        raise ValueError(f"unknown VLM {name!r}; the bundled one is 'minillava'")
    from safetensors.torch import load_file

    record = projector_record()
    model, processor = build_minillava(attn_implementation=attn_implementation, cache_dir=cache_dir)
    model.model.multi_modal_projector.load_state_dict(load_file(_checked(PROJECTOR_FILE, record["sha256"])))
    if "lora" in record:
        lora = load_file(_checked(LORA_FILE, record["lora_sha256"]))
        scale = record["lora"]["alpha"] / record["lora"]["rank"]
        layers = model.model.language_model.layers
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for target in record["lora"]["targets"]:
                    key = f"layers.{i}.self_attn.{target}"
                    delta = lora[key + ".lora_B"].float() @ lora[key + ".lora_A"].float()
                    getattr(layer.self_attn, target).weight += scale * delta
    return model.eval(), processor


def _checked(file: str, sha256: str) -> Path:
    path = projector_path().parent / file
    if not path.is_file():
        raise FileNotFoundError(f"mini-LLaVA weights not found at {path}; run tools/train_minillava.py")
    if _sha256(path) != sha256:
        raise ValueError(f"{path} does not match its recorded SHA-256 {sha256}; the file is corrupt or stale")
    return path


class MiniLlavaProcessor:
    """Images and questions -> model inputs, like a transformers processor.

    ``processor(images=[PIL ...], text=[str ...], return_tensors="pt", padding=True)`` wraps each text
    in SmolLM2's ChatML turn (no system prompt), puts the image where the text says ``<image>`` (or
    before the question when it does not), expands it to 144 image tokens, and left-pads the batch
    so ``generate`` continues every row. ``images=None`` gives the text-only prompts (the blind row).
    """

    image_token = "<image>"

    def __init__(self, tokenizer, image_size: int = IMAGE_SIZE):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = (image_size // PATCH) ** 2

    def prompt(self, text: str, with_image: bool) -> str:
        body = text.replace(self.image_token, "").strip()
        if with_image:
            body = text.strip() if self.image_token in text else f"{self.image_token}\n{body}"
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"

    def _ids(self, prompt: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(prompt.split(self.image_token)):
            if k:
                ids += [IMAGE_TOKEN_ID] * self.num_image_tokens
            ids += self.tokenizer.encode(part, add_special_tokens=False)
        return ids

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        from .dinov2 import preprocess

        return preprocess(list(images), size=self.image_size, crop=False)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **_: Any):
        from transformers import BatchFeature

        if return_tensors != "pt":
            raise ValueError("MiniLlavaProcessor returns torch tensors only: pass return_tensors='pt'")
        texts = [text] if isinstance(text, str) else list(text or [])
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts; give one image per text")
        rows = [self._ids(self.prompt(t, images is not None)) for t in texts]
        if len({len(r) for r in rows}) > 1 and not padding:
            raise ValueError("texts of different lengths need padding=True")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        data = {"input_ids": input_ids, "attention_mask": mask}
        if images is not None:
            data["pixel_values"] = self.pixel_values(images)
        return BatchFeature(data)

    def batch_decode(self, ids, **kw):
        return self.tokenizer.batch_decode(ids, **kw)
