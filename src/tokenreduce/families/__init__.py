"""Model families, described once as data: where each family keeps what a stage reduces.

`encoders`: ViT, DeiT, DINOv2, CLIP and SigLIP vision encoders (blocks, the attention module,
the two halves of a block). `decoders`: causal-LM decoders (backbone, layers, attention
modules, which layers are full attention, the rotary embedding). Nothing here attaches to a
model; the runtime reads these descriptions.
"""

from .decoders import DECODER_FAMILIES, DecoderFamily, find_decoder
from .encoders import EncoderFamily, encoder_families, find_encoders

__all__ = ["EncoderFamily", "encoder_families", "find_encoders", "DecoderFamily", "DECODER_FAMILIES", "find_decoder"]
