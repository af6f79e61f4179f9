"""Attention rows computed from Q and K, so the model's own attention (SDPA) stays untouched.

The few rows a method needs — the [CLS] row of an encoder block, the last query or an
observation window of a decoder layer, every row's weights summed (accumulated attention) —
are computed here, once for every stage. Queries are ``[B, H, q, D]`` (post-RoPE in a
decoder), keys ``[B, H_kv, K, D]``; GQA: query head ``h`` reads KV head ``h // (H / H_kv)``,
as transformers' ``repeat_kv``. Masks are the layer's own (bool: True attends; float:
additive) or None for a plain causal prefill.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cls_attention(query: Tensor, key: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Softmax row of the first query (an encoder's [CLS]) over every key: ``[B, H, N]``."""
    logits = (query[:, :, :1] @ key.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + (mask[..., :1, :] if mask.shape[-2] > 1 else mask)
    return logits.softmax(-1)[:, :, 0]


def full_attention(query: Tensor, key: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Every softmax row ``[B, H, N, N]`` (an encoder block's attention map)."""
    logits = (query @ key.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + mask
    return logits.softmax(-1)


def accumulated_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None, row_valid: Tensor,
                          weights, chunk: int = 256) -> Tensor:
    """``weights(logits)`` of every real query row, summed over rows: ``[B, H, K]`` (float32 or float64).

    Computed from Q and K in chunks of ``chunk`` rows, so memory stays ``B H chunk K`` and the
    model's own attention (SDPA) is untouched. ``row_valid`` [B, q]: padding rows add nothing.
    """
    q, k = query.shape[-2], key.shape[-2]
    total = None
    padded = not bool(row_valid.all())
    for lo in range(0, q, chunk):
        hi = min(q, lo + chunk)
        seen = k - q + hi  # causal: rows lo..hi-1 see no key beyond this one
        w = weights(row_logits(query, key[..., :seen, :], None if mask is None else mask[..., :seen], scaling,
                                lo, hi, k_total=k))
        if padded:
            w = torch.nan_to_num(w, nan=0.0).masked_fill(~row_valid[:, None, lo:hi, None].to(w.device), 0.0)
        part = w.sum(2)
        if total is None:
            total = part.new_zeros(*part.shape[:-1], k)
        total[..., :seen] += part
    return total


def row_logits(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None, lo: int, hi: int,
                k_total: int | None = None) -> Tensor:
    """Scaled, masked logits ``[B, H, hi - lo, K]`` of query rows ``lo:hi`` (``-inf`` where not attended).

    ``key`` (and ``mask``'s columns) may be the first ``K`` of the layer's ``k_total`` keys, the queries being
    its last ones: a causal chunk of rows needs no later key.
    """
    b, h, q, d = query.shape
    hk, k = key.shape[1], key.shape[-2]
    k_total = k if k_total is None else k_total
    g, r = h // hk, hi - lo
    scale = scaling if scaling is not None else d ** -0.5
    dt = torch.promote_types(query.dtype, torch.float32)
    qw = query[:, :, lo:hi].to(dt).reshape(b, hk, g * r, d)
    logits = (qw @ key.to(dt).transpose(-1, -2)).reshape(b, h, r, k) * scale
    if mask is None:
        cols = torch.arange(k, device=key.device)
        allowed = cols[None, :] <= (k_total - q + torch.arange(lo, hi, device=key.device))[:, None]
        return logits.masked_fill(~allowed, float("-inf"))
    m = mask[..., mask.shape[-2] - q + lo:mask.shape[-2] - q + hi, :]
    if m.dtype == torch.bool:
        return logits.masked_fill(~m, float("-inf"))
    return (logits + m.to(dt)).masked_fill(m <= torch.finfo(m.dtype).min, float("-inf"))


def window_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None, rows: int) -> Tensor:
    """Softmax rows ``[B, H, rows, K]`` (float32, float64 for a float64 model) of the last ``rows`` queries.

    ``query`` [B, H, q, D] post-RoPE, ``key`` [B, H_kv, K, D] after the cache update (GQA:
    query head ``h`` reads KV head ``h // (H / H_kv)``, as transformers' ``repeat_kv``).
    ``mask``: the layer's attention mask (bool: True attends; float: additive) or None for
    a plain causal prefill.
    """
    return row_logits(query, key, mask, scaling, query.shape[-2] - rows, query.shape[-2]).softmax(-1)
