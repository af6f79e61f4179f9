"""Decode-time eviction and in-cache positions: what the kv-cache stage does after each decoding forward.

A method that ``evicts_during_decode`` (H2O, Keyformer, rolling StreamingLLM) carries a per-slot
score in its `CompressedLayer` (``state``, per query head). After every decoding forward
`evict_step` adds that forward's attention to it (the method's ``row_weights`` of each new
query row, summed) and keeps the top ``budget`` slots by the method's ``evict_score``, so the
cache never holds more than its budget between steps. A method that ``repositions`` (rolling
StreamingLLM) then gives the kept slots the in-cache positions its ``cache_positions`` rule
says, re-rotating the keys that move (`reposition`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.kv import CompressedLayer, select_kept
from ..core.method import DecoderInfo, EvictionContext, KVMethod
from ..families.decoders import DecoderFamily
from ..scoring.rope import Rope, rotate_keys


def evict_step(method: KVMethod, info: DecoderInfo, index: int, layer: CompressedLayer, accumulated: Tensor | None,
               padding: Tensor | None, step: int, rope: Rope | None = None, positions: Tensor | None = None,
               next_position: Tensor | None = None) -> CompressedLayer | None:
    """``layer`` after decoding forward ``step``: a new layer back at its budget, or None when it is within it (its
    scores updated in place). ``accumulated`` [B, H, q_new + ...]: this forward's row weights per slot."""
    p, b = layer.physical_length, layer.keys.shape[0]
    old = layer.state
    state = torch.cat([old, old.new_zeros(*old.shape[:2], p - old.shape[-1])], dim=-1)
    if accumulated is not None:
        state = state + accumulated
    valid = layer.cache_validity(padding)
    layer.steps = step
    budget = torch.minimum(layer.budget.to(valid.device), valid.sum(-1))
    if bool((valid.sum(-1) <= budget).all()) and rope is None:
        layer.state = state
        return None
    position = layer.slot_positions()
    age = torch.where(position >= 0, layer.cumulative_length - 1 - position, torch.iinfo(torch.long).max)
    ctx = EvictionContext(layer=index, state=state, age=age, valid=valid, budgets=budget, step=step, info=info)
    kept = select_kept(method.evict_score(ctx).expand(b, layer.keys.shape[1], p), valid, budget)
    new = layer.recompress(kept, state)
    held = (new.kept >= 0)[:, 0].sum(-1).to(layer.budget.device)
    if bool((held > layer.budget).any()):
        raise NeverFiredError(f"{method!r} saw layer {index} over its budget and did not evict back to it "
                              f"(holds {held.tolist()}, budget {layer.budget.tolist()})")
    if rope is not None:
        rotary = layer.slot_rotary(positions).gather(-1, kept.clamp_min(0))
        reposition(new, rotary, rope, next_position, method)
    return new


def rope_for_repositioning(family: DecoderFamily, backbone: nn.Module, full: tuple[int, ...],
                            compressible: tuple[int, ...]) -> Rope:
    """The rotary embedding a repositioning method needs, or a clear refusal."""
    if len(full) != len(family.layers(backbone)) or compressible != full:
        raise StageError("in-cache re-positioning shifts the positions of every layer, so it needs every layer to be a "
                         "full-attention layer it compresses; this model has sliding-window or skipped layers")
    rot = getattr(backbone, "rotary_emb", None)
    kind = getattr(rot, "rope_type", None)
    if rot is None or not isinstance(getattr(rot, "inv_freq", None), Tensor) or kind not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedModelError(f"in-cache re-positioning needs a static rotary embedding (default, linear, llama3 "
                                    f"or yarn RoPE); this {family.name} model has {kind!r}")
    return Rope(rot.inv_freq.detach().clone())


def reposition(layer: CompressedLayer, rotary: Tensor, rope: Rope, next_position: Tensor, method: KVMethod) -> None:
    """Move the real slots of ``layer`` to the in-cache positions ``method.cache_positions`` gives them.

    ``rotary`` [B, H, P]: the position each slot's key carries now; ``next_position`` [B]: the
    position transformers would give the next token. Keys that move are re-rotated; the layer
    remembers its slots' positions and how far the next tokens' positions must be lowered (so
    they continue right after the last in-cache position).
    """
    real = layer.kept >= 0
    target = method.cache_positions(real)
    delta = torch.where(real, target - rotary, 0)
    if bool((delta != 0).any()):
        layer.keys = rotate_keys(layer.keys, delta, rope)
    layer.rotary = torch.where(real, target, 0)
    end = torch.where(real, target, -1).amax(-1)[:, 0] + 1  # every head holds as many real entries
    layer.position_shift = next_position.to(end.device) - end
