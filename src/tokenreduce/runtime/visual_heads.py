"""Attention edits on the visual keys of an in-LLM method's layers (YOPO's inactive visual heads and neighbour-aware
visual attention), owned by `runtime.in_llm.InLLMAttachment`.

A `LayerDropMethod` may name, per layer, the query heads whose attention to visual keys is kept
(`LayerDropMethod.visual_heads`); in the other heads the softmax weights on visual keys are set to 0
after the softmax and the rest is not renormalised (YOPO's reference), at every query row, in the
prefill and while decoding. It may name a window (`LayerDropMethod.visual_window`): in the prefill a
visual query sees the visual keys of its own image within ``window x window`` grid cells around it,
earlier ones only (causal), and every text key as before. While a method measures
(`LayerDropMethod.measures_visual_heads`), each layer's last prompt row gives, per head, its attention
mass on visual keys over its mass on the other keys.

These edits *mask*: every head still computes every key, so nothing is saved here. The stats report
the attention FLOPs a kernel that skipped the masked entries would save (``masked_attention_flops``),
never subtracted from ``flops``. Visual keys are the prompt's visual tokens (padded layout) in the
layers where they are still all present; layers after a drop are left alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import StageError
from ..scoring.attention import row_logits
from .routing import is_probing


def square_grids(visual: Tensor, who: str) -> Tensor:
    """``[B, N, 2]`` (row, column) of each visual token in its image's square grid (images = maximal runs of
    consecutive visual tokens); a run that is not a square is refused."""
    b, n = visual.shape
    coords = torch.zeros(b, n, 2, dtype=torch.long, device=visual.device)
    for s in range(b):
        v = visual[s].tolist()
        i = 0
        while i < n:
            if not v[i]:
                i += 1
                continue
            j = i
            while j < n and v[j]:
                j += 1
            side = math.isqrt(j - i)
            if side * side != j - i:
                raise StageError(f"{who}: a neighbour window needs each image's visual tokens as one square grid; "
                                 f"a run of {j - i} visual tokens is not a square (image newlines, tiles): use "
                                 "window=1 (each visual token sees itself only among the visual tokens)")
            k = torch.arange(j - i, device=visual.device)
            coords[s, i:j, 0], coords[s, i:j, 1] = k // side, k % side
            i = j
    return coords


def visual_pairs(visual: Tensor, valid: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Per sample, the (query row, visual key) pairs a causal prefill over ``valid`` rows computes [B]; with
    ``allowed`` [B, N, N] only those pairs."""
    n = visual.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=visual.device).tril()
    pairs = causal[None] & valid[:, :, None] & (visual & valid)[:, None, :]
    if allowed is not None:
        pairs = pairs & allowed
    return pairs.sum((-1, -2)).to(torch.float64)


class VisualAttentionEdits:
    """The listener of the edits; the in-LLM attachment routes it on ``layers`` and hands it each prompt's visual
    tokens (`prompt`)."""

    def __init__(self, method, heads: dict[int, Tensor], window: int | None, measure: bool, layers: list[int],
                 num_heads: int, head_dim: int, impl: str):
        self.method, self.heads, self.window, self.measure = method, heads, window, measure
        self.layers, self.num_heads, self.head_dim, self.impl = set(layers), num_heads, head_dim, impl
        self._visual: Tensor | None = None  # [B, N] the current prompt's visual tokens (padded layout)
        self._valid: Tensor | None = None
        self._allowed: Tensor | None = None  # [B, N, N] the neighbour rule over the prompt
        self.ratios: dict[int, Tensor] = {}  # layer -> [B, H] visual / other attention mass of the last row
        self.masked_flops = 0.0

    def prompt(self, visual: Tensor | None, valid: Tensor | None) -> None:
        """A new prefill: its visual tokens (None: a text-only prompt, nothing to edit)."""
        self.ratios, self.masked_flops = {}, 0.0
        self._visual, self._valid, self._allowed = visual, valid, None
        if visual is None:
            return
        if self.window is not None:
            if self.window == 1:  # itself only: no grid needed
                near = torch.eye(visual.shape[1], dtype=torch.bool, device=visual.device)[None]
            else:
                coords = square_grids(visual, self.method.name)
                image = torch.cumsum(torch.cat([visual[:, :1], visual[:, 1:] & ~visual[:, :-1]], 1).long(), 1)
                near = ((coords[:, :, None, :] - coords[:, None, :, :]).abs().amax(-1) <= (self.window - 1) // 2) & \
                    (image[:, :, None] == image[:, None, :])
            self._allowed = ~(visual[:, :, None] & visual[:, None, :]) | near
            pairs = visual_pairs(visual, valid) - visual_pairs(visual, valid, self._allowed)
            self.masked_flops += 4.0 * self.head_dim * self.num_heads * float(pairs.mean()) * len(self.layers)
        left = visual_pairs(visual, valid, self._allowed).mean()  # QK^T and AV over the visual keys still seen
        for on in self.heads.values():
            self.masked_flops += 4.0 * self.head_dim * int((~on).sum()) * float(left)

    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        visual = self._visual
        if visual is None or index not in self.layers or is_probing(module):
            return proceed(query, key, value, attention_mask, **kwargs)
        b, _, q, _ = query.shape
        k = key.shape[-2]
        n = visual.shape[1]
        if k < n:  # not this prompt's layout (cannot happen in the layers before a drop): leave it
            return proceed(query, key, value, attention_mask, **kwargs)
        vk = torch.zeros(b, k, dtype=torch.bool, device=key.device)
        vk[:, :n] = visual  # the cache of these layers is the whole padded prompt, then the generated tokens
        prefill = q == k == n
        mask = attention_mask[..., :k] if isinstance(attention_mask, Tensor) else attention_mask
        if self.measure and prefill:
            w = row_logits(query, key, mask, kwargs.get("scaling"), q - 1, q, k).softmax(-1)[:, :, 0]
            w = torch.nan_to_num(w, nan=0.0)
            ratio = (w * vk[:, None]).sum(-1) / (w * ~vk[:, None]).sum(-1)
            self.ratios[index] = torch.where(vk.any(-1)[:, None], ratio, float("nan"))  # NaN: no visual token
        if prefill and self._allowed is not None:
            mask = self._neighbour_mask(mask, q, query.dtype)
            if index not in self.heads:
                return proceed(query, key, value, mask, **kwargs)
        heads = self.heads.get(index)
        if heads is None:
            return proceed(query, key, value, mask, **kwargs)
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise StageError(f"{self.method.name}: masking visual heads recomputes attention without logit softcapping "
                             "or attention sinks; this model uses them")
        if module.training and kwargs.get("dropout", 0.0):
            raise StageError(f"{self.method.name}: masking visual heads runs in eval mode only (no attention dropout)")
        logits = row_logits(query, key, mask, kwargs.get("scaling"), 0, q, k)
        w = torch.nan_to_num(logits.softmax(-1), nan=0.0)  # a padded row that sees nothing: no weight
        w = w.masked_fill(~heads.to(w.device)[None, :, None, None] & vk[:, None, None, :], 0.0)
        w = w.to(query.dtype)
        v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return (w @ v).transpose(1, 2).contiguous(), w

    def _neighbour_mask(self, mask, q: int, dtype):
        allowed = self._allowed[:, None]
        if mask is None:  # a causal prefill without padding (SDPA)
            mask = torch.ones(q, q, dtype=torch.bool, device=allowed.device).tril()[None, None]
            if self.impl == "eager":
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask,
                                                                                           torch.finfo(dtype).min)
        if mask.dtype == torch.bool:
            return mask & allowed
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
