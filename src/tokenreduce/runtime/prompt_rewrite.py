"""A prompt rewritten to fewer tokens before the decoder runs, and the cache that must stand for the whole prompt.

Two stages shorten the prompt the decoder prefills: the prompt filter (GemFilter) and the
connector (visual tokens). Both keep ``k`` of the caller's ``N`` prompt tokens, so after the
prefill every cache layer holds ``k`` entries while the caller — ``generate``'s growing 2-D mask,
its positions, its slicing of inputs by ``get_seq_length`` — counts ``N``. `stand_for_prompt`
turns each layer into a `core.kv.CompressedLayer` of logical length ``N`` and physical length
``k``; `continue_prompt` keeps a later forward's 2-D mask right when samples kept different
counts (their padded slots must stay masked in every later step: the mask covers logical
positions, so the slots' validity is written into the columns the compressed slots stand for).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from ..core.errors import StageError
from ..core.kv import CompressedLayer


def continue_prompt(kw: dict, cache: Cache, batch: int, q: int, owner, flagged: weakref.WeakSet, who: str) -> dict:
    """A later forward on a rewritten prompt's cache: let its layers be masked by transformers' one mask."""
    layers = [l for l in cache.layers if isinstance(l, CompressedLayer)]
    if any(l.refiltered for l in layers):
        return kw  # a kv-cache stage compressed the rewritten cache further: it masks every layer itself
    for l in layers:
        l.masked_by = owner
        flagged.add(l)
    first = layers[0]
    if first.slot_valid is None:
        return kw  # every sample kept the same count: the caller's own mask is right as it is
    same = len(layers) == len(cache.layers) and all(
        l.slot_valid is not None and torch.equal(l.slot_valid, first.slot_valid)
        and l.compressed_length == first.compressed_length and l.physical_length == first.physical_length
        for l in layers[1:])
    if not same:
        raise StageError("this cache's layers were compressed differently (a kv-cache method's per-layer "
                         f"layout); {who} continues only caches whose prompt it rewrote itself")
    mask = kw.get("attention_mask")
    logical = first.get_seq_length() + q
    if mask is None:
        mask = torch.ones(batch, logical, dtype=torch.long, device=first.keys.device)
    elif not isinstance(mask, Tensor) or mask.dim() != 2:
        raise StageError(f"a custom attention mask cannot follow a prompt {who} shortened to different lengths per "
                         "sample; pass a 2-D padding mask over the whole sequence (or none)")
    if mask.shape[1] != logical:
        raise StageError(f"the attention_mask covers {mask.shape[1]} positions, but the shortened cache stands for "
                         f"{first.get_seq_length()} tokens plus {q} new ones; pass a 2-D mask over the whole sequence")
    off = first.compressed_length - first.compressed_slots
    mask = mask.clone()
    mask[:, off:off + first.compressed_slots] = first.slot_valid.to(device=mask.device, dtype=mask.dtype)
    out = dict(kw)
    out["attention_mask"] = mask
    return out


def refer_to_prompt(layer: CompressedLayer, kept: Tensor, length: int) -> CompressedLayer:
    """A layer a kv-cache stage compressed during the shortened prefill, made to stand for the whole prompt.

    Its slots point into the ``k`` kept tokens; ``kept`` [B, H_kv, k] maps those to prompt
    positions, and the logical length becomes the prompt's, as for a layer only the rewrite shortened.
    """
    inner = layer.kept.to(kept.device)
    layer.kept = torch.where(inner >= 0, kept.gather(-1, inner.clamp_min(0)), -1)
    layer.cumulative_length += length - layer.compressed_length
    layer.compressed_length = length
    layer.refiltered = True
    return layer


def stand_for_prompt(cache: Cache, kept: Tensor, length: int, num_kv_heads: int, owner) -> list[tuple[int, DynamicLayer, CompressedLayer]]:
    """Turn every layer of ``cache`` (``k`` entries after the shortened prefill) into a layer standing for the
    ``length``-token prompt; ``kept`` [B, k] the prompt position of each entry (-1 = padded slot).
    Returns (layer index, before, after) for each layer."""
    k = kept.shape[1]
    slot = kept >= 0
    kept_h = kept[:, None, :].expand(-1, num_kv_heads, -1)
    slot_valid = None if bool(slot.all()) else slot
    out = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer) and layer.compressed_length == k:
            new = refer_to_prompt(layer, kept_h, length)  # a kv-cache stage compressed it further
        elif type(layer) is DynamicLayer and layer.is_initialized and layer.keys.shape[-2] == k:
            new = CompressedLayer(layer.keys, layer.values, length, kept_h, slot_valid)
        else:
            held = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0
            raise StageError(f"layer {i} of the cache holds {held} entries after the shortened prefill, expected {k}")
        new.rewritten_by = owner
        cache.layers[i] = new
        out.append((i, layer, new))
    return out
