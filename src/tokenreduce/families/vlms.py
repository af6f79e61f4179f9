"""Vision-language model families, described as data: where the language model, the vision tower
and the visual placeholder tokens are, and what shape the language model's positions and masks take.

Every transformers VLM listed here embeds the prompt, computes the image (and video) features,
``masked_scatter`` s them into the embeddings at the placeholder tokens, and calls its language
model. The connector and in-LLM stages hook that call; visual spans always come from the input
ids and the model's placeholder ids, never from offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import UnsupportedModelError
from ..core.method import ImageTiles


@dataclass(frozen=True)
class VLMFamily:
    """One VLM family: attribute names on its inner model (``model.model``) and its conventions."""

    name: str
    model_classes: tuple[str, ...]  # the inner model holding tower and language model
    language_model: str  # attribute of the inner model
    tower: str  # attribute of the inner model
    token_ids: tuple[str, ...] = ("image_token_id",)  # config fields of the visual placeholder ids
    positions: str = "1d"  # "1d": position_ids [B, L]; "mrope": [3 or 4, B, L] (Qwen M-RoPE)
    mask: str = "2d"  # "2d": a padding mask; "dict": a dict of 4-D masks built by the outer model (Gemma 3)
    deepstack: bool = False  # Qwen3-VL: visual features added after early layers (visual_pos_masks, ...)
    cls_tower: bool = True  # the tower has a [CLS] at index 0 that the features drop ("default" strategy)
    # The projector reads the select layer's tokens one to one, so a tower method (an encoder method before the
    # select layer) can hand the language model fewer visual tokens. Families that reshape the patch grid after
    # the tower (LLaVA-NeXT's unpadding and newlines, LLaVA-OneVision's, Gemma 3's pooling) cannot.
    tower_reduction: bool = False
    # Each image is a base view then crops, packed by the inner model's ``pack_image_features`` (LLaVA-NeXT's AnyRes:
    # unpadded, a newline ending each row): `anyres_tiles` reads the layout from that very function.
    anyres: bool = False


LLAVA = VLMFamily("llava", ("LlavaModel",), "language_model", "vision_tower", tower_reduction=True)
LLAVA_NEXT = VLMFamily("llava_next", ("LlavaNextModel",), "language_model", "vision_tower",
                       anyres=True)  # spans include newlines
LLAVA_ONEVISION = VLMFamily("llava_onevision", ("LlavaOnevisionModel",), "language_model", "vision_tower",
                            token_ids=("image_token_id", "video_token_id"), cls_tower=False)  # SigLIP tower
QWEN2_VL = VLMFamily("qwen2_vl", ("Qwen2VLModel",), "language_model", "visual",
                     token_ids=("image_token_id", "video_token_id"), positions="mrope", cls_tower=False)
QWEN2_5_VL = VLMFamily("qwen2_5_vl", ("Qwen2_5_VLModel",), "language_model", "visual",
                       token_ids=("image_token_id", "video_token_id"), positions="mrope", cls_tower=False)
QWEN3_VL = VLMFamily("qwen3_vl", ("Qwen3VLModel",), "language_model", "visual",
                     token_ids=("image_token_id", "video_token_id"), positions="mrope", deepstack=True,
                     cls_tower=False)
IDEFICS3 = VLMFamily("idefics3", ("Idefics3Model",), "text_model", "vision_model", cls_tower=False)
SMOLVLM = VLMFamily("smolvlm", ("SmolVLMModel",), "text_model", "vision_model", cls_tower=False)
GEMMA3 = VLMFamily("gemma3", ("Gemma3Model",), "language_model", "vision_tower", mask="dict", cls_tower=False)

VLM_FAMILIES: tuple[VLMFamily, ...] = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, IDEFICS3,
                                       SMOLVLM, GEMMA3)
SUPPORTED_VLMS = ("Llava, LlavaNext, LlavaOnevision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM, Gemma 3 "
                  "(*ForConditionalGeneration or the inner *Model)")


@dataclass
class VLMParts:
    """A VLM found in a model: its family, inner model, language model, tower and placeholder ids."""

    family: VLMFamily
    inner: nn.Module
    language_model: nn.Module
    tower: nn.Module
    token_ids: tuple[int, ...]

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """[B, L] True at visual placeholder tokens (images and videos)."""
        ids = torch.tensor(self.token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)


def find_vlm(model: nn.Module) -> VLMParts | None:
    """The VLM inside ``model``, or None when the model is not a vision-language model we know."""
    for module in model.modules():
        for fam in VLM_FAMILIES:
            if type(module).__name__ in fam.model_classes:
                config = module.config
                ids = tuple(int(getattr(config, f)) for f in fam.token_ids if getattr(config, f, None) is not None)
                return VLMParts(fam, module, getattr(module, fam.language_model), getattr(module, fam.tower), ids)
    return None


def require_vlm(model: nn.Module, who: str) -> VLMParts:
    """The VLM inside ``model``; refuses a text-only or unknown model, naming the supported families."""
    parts = find_vlm(model)
    if parts is None:
        what = ("a vision-language model of an unsupported family" if getattr(getattr(model, "config", None),
                                                                                "vision_config", None) is not None
                else "not a vision-language model")
        raise UnsupportedModelError(f"{who} reduces visual tokens, but {type(model).__name__} is {what}; supported: "
                                    f"{SUPPORTED_VLMS}")
    return parts


def anyres_tiles(inner: nn.Module, image_sizes: Tensor) -> list[ImageTiles]:
    """Per image (``image_sizes`` [images, 2] (height, width), as the VLM was called): where its base view, crops and
    newlines sit among its visual tokens (`core.method.ImageTiles`). Read by running the inner model's own
    ``pack_image_features`` on token numbers instead of features, so the layout is the model's, unpadding included."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config, vision = inner.config, inner.config.vision_config
    side = vision.image_size // vision.patch_size
    out = []
    for size in image_sizes.tolist():
        gh, gw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
        numbers = torch.arange((1 + gh * gw) * side * side, dtype=torch.float64).view(1 + gh * gw, side * side, 1)
        packed, _ = inner.pack_image_features([numbers], torch.tensor([size]), config.vision_feature_select_strategy,
                                              image_newline=torch.full((1,), -1.0, dtype=torch.float64))
        number = packed[0][:, 0].round().long()
        part = torch.where(number < 0, -1, number // (side * side))
        rows = int((part == -1).sum())
        width = (number.numel() - side * side) // max(rows, 1) - 1  # each raster row ends with its newline
        raster = side * side + torch.arange(rows)[:, None] * (width + 1) + torch.arange(width)[None]
        out.append(ImageTiles(part=part, side=side, grid=(gh, gw), raster=raster))
    return out
