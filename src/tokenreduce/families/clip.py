"""transformers CLIP and SigLIP vision towers: pre-norm blocks; CLIP has [CLS], SigLIP has none."""

from __future__ import annotations

from .encoders import EncoderFamily


def _attention_part(block, x, mask=None, *args, **kwargs):
    h, _ = block.self_attn(hidden_states=block.layer_norm1(x), attention_mask=mask, **kwargs)
    return x + h


def _mlp_part(block, x):
    return x + block.mlp(block.layer_norm2(x))


CLIP = EncoderFamily(
    name="clip",
    block_classes=("CLIPEncoderLayer",),
    attention=lambda block: block.self_attn,
    attention_part=_attention_part,
    mlp_part=_mlp_part,
    num_prefix=lambda cfg: 1,
    mlp_size=lambda cfg: cfg.intermediate_size,
)

SIGLIP = EncoderFamily(
    name="siglip",
    block_classes=("SiglipEncoderLayer",),
    attention=lambda block: block.self_attn,
    attention_part=_attention_part,
    mlp_part=_mlp_part,
    num_prefix=lambda cfg: 0,  # no [CLS]: pooling is a learned attention head over all tokens
    mlp_size=lambda cfg: cfg.intermediate_size,
)
