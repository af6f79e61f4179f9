"""Rotary position embedding (RoPE) in transformers' rotate-half layout: apply, invert, move a key.

Used wherever a stage needs positions other than the ones the model applied: StreamingLLM's
rolling cache moves cached keys to in-cache positions (`rotate_keys`), A²ATS un-rotates keys
and rotates queries to a fixed position (`rotate`, `unrotate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to ``x`` [B, H, q, D] with ``cos``/``sin`` [B or 1, q, r] (r <= D rotary dims, as transformers)."""
    r = cos.shape[-1]
    c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    xr = x[..., :r]
    return torch.cat((xr * c + _rotate_half(xr) * s, x[..., r:]), dim=-1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse of `rotate` (divides by cos² + sin², the RoPE attention scaling squared)."""
    r = cos.shape[-1]
    c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    xr = x[..., :r]
    return torch.cat(((xr * c - _rotate_half(xr) * s) / (c * c + s * s), x[..., r:]), dim=-1)


@dataclass(frozen=True)
class Rope:
    """A model's rotary embedding, enough to move a cached (rotated) key to another position."""

    inv_freq: Tensor  # [rot_dim / 2]


def rotate_keys(keys: Tensor, delta: Tensor, rope: Rope) -> Tensor:
    """Keys ``[B, H, P, D]`` (rotated, transformers' rotate-half layout) moved by ``delta`` [B, H, P] positions."""
    inv = rope.inv_freq.to(device=keys.device, dtype=torch.float64)
    r = 2 * inv.numel()
    angle = delta.to(torch.float64)[..., None] * inv  # [B, H, P, r/2]
    cos, sin = angle.cos(), angle.sin()
    k = keys[..., :r].to(torch.float64)
    a, b = k[..., : r // 2], k[..., r // 2:]
    moved = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(keys.dtype)
    return torch.cat([moved, keys[..., r:]], dim=-1)
