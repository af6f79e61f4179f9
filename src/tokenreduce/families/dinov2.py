"""transformers DINOv2: pre-norm blocks with LayerScale, [CLS] in front (plus registers, if any)."""

from __future__ import annotations

from .encoders import EncoderFamily


def _attention_part(block, x, mask=None, *args, **kwargs):
    h, _ = block.attention(block.norm1(x), attention_mask=mask, **kwargs)
    return block.drop_path(block.layer_scale1(h)) + x


def _mlp_part(block, x):
    return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x)))) + x


def _mlp_size(cfg) -> int:
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 * 3 // 2 if cfg.use_swiglu_ffn else hidden  # SwiGLU: 3 matrices


DINOV2 = EncoderFamily(
    name="dinov2",
    block_classes=("Dinov2Layer", "Dinov2WithRegistersLayer"),
    attention=lambda block: block.attention,
    attention_part=_attention_part,
    mlp_part=_mlp_part,
    num_prefix=lambda cfg: 1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
    mlp_size=_mlp_size,
)
