"""transformers ViT and DeiT: pre-norm blocks, [CLS] (+ DeiT's distillation token) in front."""

from __future__ import annotations

from .encoders import EncoderFamily


def _attention_part(block, x, mask=None, *args, **kwargs):
    h, _ = block.attention(block.layernorm_before(x), mask, **kwargs)
    return block.dropout(h) + x


def _mlp_part(block, x):
    return block.dropout(block.mlp(block.layernorm_after(x))) + x


VIT = EncoderFamily(
    name="vit",
    block_classes=("ViTLayer",),
    attention=lambda block: block.attention,
    attention_part=_attention_part,
    mlp_part=_mlp_part,
    num_prefix=lambda cfg: 1,
    mlp_size=lambda cfg: cfg.intermediate_size,
)

DEIT = EncoderFamily(
    name="deit",
    block_classes=("DeiTLayer",),
    attention=lambda block: block.attention,
    attention_part=_attention_part,
    mlp_part=_mlp_part,
    num_prefix=lambda cfg: 2,  # [CLS] and the distillation token
    mlp_size=lambda cfg: cfg.intermediate_size,
)
