"""Vision-encoder families, described as data: where the blocks are and how one block splits in two.

The encoder stage (`runtime.encoder`) reduces tokens between a block's attention part and its
MLP part; a family says which block classes it recognises, which module of a block calls the
attention function, how to run each half, and two numbers read from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..core.errors import UnsupportedModelError


@dataclass(frozen=True)
class EncoderFamily:
    """Where a model family keeps its encoder blocks and how one block is split in two."""

    name: str
    block_classes: tuple[str, ...]
    attention: Callable[[nn.Module], nn.Module]  # the module that calls the attention interface
    attention_part: Callable[..., Tensor]  # (block, x, mask, **kwargs) -> x + attention residual
    mlp_part: Callable[[nn.Module, Tensor], Tensor]  # (block, x) -> x + MLP residual
    num_prefix: Callable[[object], int]  # protected leading tokens, from the config
    mlp_size: Callable[[object], int]  # from the config


def encoder_families() -> tuple[EncoderFamily, ...]:
    from .clip import CLIP, SIGLIP
    from .dinov2 import DINOV2
    from .vit import DEIT, VIT

    return (VIT, DEIT, DINOV2, CLIP, SIGLIP)


SUPPORTED_ENCODERS = ("ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel",
                      "and the heads built on them (*ForImageClassification, CLIPVisionModelWithProjection)")


def find_encoders(model: nn.Module) -> list[tuple[EncoderFamily, nn.Module, nn.ModuleList, object]]:
    """(family, owner module, block list, config) for every encoder in ``model``."""
    found = []
    families = encoder_families()
    for owner in model.modules():
        for child in owner.children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            names = {type(b).__name__ for b in child}
            for fam in families:
                if names <= set(fam.block_classes):
                    found.append((fam, owner, child, fam.attention(child[0]).config))
    if not found:
        raise UnsupportedModelError(
            f"no supported vision encoder found in {type(model).__name__}; the encoder stage supports "
            + ", ".join(SUPPORTED_ENCODERS))
    return found
