"""Causal-LM decoder families, described as data: backbone, layers, attention modules.

Which layers are full attention comes from the config's layer types (transformers' own
``get_layer_types_and_kwargs``): sliding-window layers (Mistral with ``sliding_window`` set,
Qwen2 with ``use_sliding_window``, five of every six Gemma 3 layers) already bound their
cache and are left alone by every decoder-side stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from ..core.errors import UnsupportedModelError
from ..core.method import DecoderInfo


@dataclass(frozen=True)
class DecoderFamily:
    """Where a causal-LM family keeps its decoder layers and attention modules."""

    name: str
    backbone_classes: tuple[str, ...]  # the module holding ``layers`` and building the masks
    attention_classes: tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList] = lambda backbone: backbone.layers
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn


LLAMA = DecoderFamily("llama", ("LlamaModel",), ("LlamaAttention",))  # SmolLM2
QWEN2 = DecoderFamily("qwen2", ("Qwen2Model",), ("Qwen2Attention",))
QWEN3 = DecoderFamily("qwen3", ("Qwen3Model",), ("Qwen3Attention",))  # q/k norms: we see Q and K after them
MISTRAL = DecoderFamily("mistral", ("MistralModel",), ("MistralAttention",))
PHI3 = DecoderFamily("phi3", ("Phi3Model",), ("Phi3Attention",))  # fused qkv projection: irrelevant here
# Gemma 3: five sliding-window layers to one global layer; only the global layers are compressed. Its attention
# scale (query_pre_attn_scalar) reaches our function as ``scaling``, its q/k norms come before, as Qwen3's.
GEMMA3 = DecoderFamily("gemma3", ("Gemma3TextModel",), ("Gemma3Attention",))

# the language models of Qwen's VLMs: M-RoPE positions [3 or 4, B, L] (rotated inside the attention module)
QWEN2_VL = DecoderFamily("qwen2_vl", ("Qwen2VLTextModel",), ("Qwen2VLAttention",))
QWEN2_5_VL = DecoderFamily("qwen2_5_vl", ("Qwen2_5_VLTextModel",), ("Qwen2_5_VLAttention",))
QWEN3_VL = DecoderFamily("qwen3_vl", ("Qwen3VLTextModel",), ("Qwen3VLTextAttention",))

DECODER_FAMILIES: tuple[DecoderFamily, ...] = (LLAMA, QWEN2, QWEN3, MISTRAL, PHI3, GEMMA3, QWEN2_VL, QWEN2_5_VL,
                                               QWEN3_VL)
SUPPORTED_DECODERS = ("Llama (SmolLM2), Qwen2, Qwen3, Mistral, Phi3, Gemma3 (*ForCausalLM or the bare *Model), and the "
                      "language models of Qwen2-VL, Qwen2.5-VL, Qwen3-VL")


def find_decoder(model: nn.Module) -> tuple[DecoderFamily, nn.Module]:
    """(family, backbone) of the one supported causal-LM decoder inside ``model``."""
    found = [(fam, module) for module in model.modules() for fam in DECODER_FAMILIES
             if type(module).__name__ in fam.backbone_classes]
    if not found:
        raise UnsupportedModelError(f"no supported causal-LM decoder found in {type(model).__name__}; decoder-side "
                                    f"methods support {SUPPORTED_DECODERS}")
    if len(found) > 1:
        raise UnsupportedModelError(f"{type(model).__name__} holds {len(found)} decoders; attach to one of them")
    return found[0]


def attention_modules(family: DecoderFamily, backbone: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order, checked against the family's classes."""
    attns = [family.attention(layer) for layer in family.layers(backbone)]
    for a in attns:
        if type(a).__name__ not in family.attention_classes:
            raise UnsupportedModelError(f"{family.name}: expected {family.attention_classes} attention modules, "
                                        f"found {type(a).__name__}")
    return attns


def layer_types(config) -> list[str]:
    """Each layer's attention type ("full_attention", "sliding_attention", ...), as transformers reads it."""
    return list(get_layer_types_and_kwargs(config)[0])


def full_attention_layers(family: DecoderFamily, backbone: nn.Module, who: str) -> tuple[int, ...]:
    """The full-attention layers of the decoder, or a refusal naming ``who`` when every layer slides."""
    config = backbone.config
    types = layer_types(config)
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    if not full:
        raise UnsupportedModelError(
            f"every layer of this {family.name} model is a {types[0]!r} layer (sliding_window="
            f"{getattr(config, 'sliding_window', None)}); {who} leave sliding-window layers alone (they already bound "
            "their cache), so there is nothing to do")
    return full


def decoder_info(family: DecoderFamily, backbone: nn.Module, compressible: tuple[int, ...] | None = None) -> DecoderInfo:
    """What a decoder-side method may know of the model; ``compressible`` defaults to the full-attention layers."""
    config = backbone.config
    heads = config.num_attention_heads
    if compressible is None:
        compressible = tuple(i for i, t in enumerate(layer_types(config)) if t == "full_attention")
    return DecoderInfo(
        family=family.name, num_layers=len(family.layers(backbone)), num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size, compressible=tuple(compressible),
    )
