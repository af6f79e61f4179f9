"""Model-family adapters: where each family keeps what a stage reduces.

`find_encoders` locates the encoder blocks of any supported vision family inside a model
(a bare encoder, a classifier on top of one, or a vision tower inside a larger model).
"""

from __future__ import annotations

from torch import nn

from ..core.errors import UnsupportedModelError
from .clip import CLIP, SIGLIP
from .dinov2 import DINOV2
from .encoder import EncoderFamily
from .vit import DEIT, VIT

ENCODER_FAMILIES: tuple[EncoderFamily, ...] = (VIT, DEIT, DINOV2, CLIP, SIGLIP)
SUPPORTED_ENCODERS = ("ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel",
                      "and the heads built on them (*ForImageClassification, CLIPVisionModelWithProjection)")


def find_encoders(model: nn.Module) -> list[tuple[EncoderFamily, nn.Module, nn.ModuleList, object]]:
    """(family, owner module, block list, config) for every encoder in ``model``."""
    found = []
    for owner in model.modules():
        for child in owner.children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            names = {type(b).__name__ for b in child}
            for fam in ENCODER_FAMILIES:
                if names <= set(fam.block_classes):
                    found.append((fam, owner, child, fam.attention(child[0]).config))
    if not found:
        raise UnsupportedModelError(
            f"no supported vision encoder found in {type(model).__name__}; the encoder stage supports "
            + ", ".join(SUPPORTED_ENCODERS))
    return found
