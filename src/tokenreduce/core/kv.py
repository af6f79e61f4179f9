"""A compressed KV-cache layer for transformers' Cache API, and the selection that fills it.

After prefill, a kv-cache method scores every cached entry of a layer; `select_kept` turns
the scores and a per-sample budget into a `Reduction` per (sample, KV head) and
`CompressedLayer.compress` replaces the layer's keys and values by the kept ones. The
cache really shrinks: the new tensors are ``[B, H_kv, M, D]`` with ``M`` the largest
per-sample budget.

Positions: kept keys were rotated (RoPE) before they were cached, so they keep their
positions. New tokens must continue at the *logical* length (all tokens seen so far), not
at the physical one, so ``get_seq_length()`` reports the logical length (the model and
``generate`` derive new positions from it) while ``get_mask_sizes()`` reports the physical
length plus an offset (logical - physical): transformers' mask builder then slices the 2-D
padding mask to its last columns and aligns the causal mask, as for its own
`DynamicSlidingWindowLayer`.

Per-sample budgets (a batch of mixed-length, left-padded prompts keeps a different number
of entries per sample) are stored left-padded: sample ``b`` holds its kept entries in the
last ``m_b`` slots, in their original order, and ``slot_valid[b]`` marks the real slots.
transformers builds one mask per forward from the first layer's sizes and cannot know these
per-sample slots, so such a cache needs the decoder attachment, which builds each layer's
mask itself (`layer_mask`). Outside an attachment, a layer that would be mis-masked raises
instead of attending to padding (`CompressedLayer.check_masked`, called from
``get_mask_sizes`` — which transformers calls before any layer runs — and ``update``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from .errors import StageError
from .reduction import Reduction


def select_kept(scores: Tensor, valid: Tensor, budgets: Tensor) -> Tensor:
    """Kept cache positions ``[B, H, M]``: per sample and head, the ``budgets[b]`` best scores.

    ``scores`` [B, H, N] (higher keeps; ``+inf`` forces), ``valid`` [B, N] (padding is never
    kept), ``budgets`` [B] with ``budgets[b] <= valid[b].sum()``. Ties go to the later
    (more recent) position. Kept positions are in ascending order; a sample with fewer than
    ``M = budgets.max()`` entries is left-padded with ``-1``.
    """
    n = scores.shape[-1]
    s = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~valid[:, None, :], float("-inf"))
    # stable descending sort of the reversed sequence: among equal scores the later position wins
    order = torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices
    best = (n - 1) - order
    m = int(budgets.max())
    top = best[..., :m]
    take = torch.arange(m, device=scores.device)[None, None, :] < budgets.to(scores.device)[:, None, None]
    top = torch.where(take, top, torch.full_like(top, -1))
    return top.sort(dim=-1).values  # -1 first: left padding, then ascending positions


def kv_bytes(layer) -> int:
    """Bytes held by a cache layer's keys and values (physically)."""
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
    return total


class CompressedLayer(DynamicLayer):
    """A `DynamicLayer` whose first entries were compressed: logical and physical lengths differ.

    ``keys``/``values``: ``[B, H_kv, P, D]``, the ``P_c`` compressed slots followed by the
    tokens appended since. ``cumulative_length``: tokens seen (logical). ``slot_valid``:
    ``[B, P_c]`` real compressed slots, None when every sample kept the same count.
    ``kept``: ``[B, H_kv, P_c]`` the position (in the layer before compression) each slot
    came from, ``-1`` for a padded slot.
    """

    def __init__(self, keys: Tensor, values: Tensor, logical_length: int, kept: Tensor,
                 slot_valid: Tensor | None = None):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.cumulative_length = int(logical_length)
        self.compressed_length = int(logical_length)  # logical length at compression
        self.compressed_slots = keys.shape[-2]
        self.kept = kept
        self.slot_valid = slot_valid
        self.uniform = True  # same physical length as every other layer of its cache (set by the attachment)
        self.masked_by = None  # the attachment that builds this layer's masks during the current forward
        # decode-time eviction (H2O, Keyformer): the per-slot score a method accumulates ([B, H, P] per query
        # head, float32), the entries each sample may hold between steps ([B]) and the decoding forwards so far
        self.state: Tensor | None = None
        self.budget: Tensor | None = None
        self.steps = 0
        # in-cache positions (StreamingLLM's rolling cache): the rotary position each compressed slot's key carries
        # ([B, H_kv, P_c]) and, per sample, how much lower the next token's position is than transformers' ([B])
        self.rotary: Tensor | None = None
        self.position_shift: Tensor | None = None
        self.refiltered = False  # a prompt filter's layer that a kv-cache method compressed further (composition)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def compress(layer: DynamicLayer, kept: Tensor) -> "CompressedLayer":
        """Keep ``kept`` [B, H, M] positions (ascending, ``-1`` = padded slot) of a layer's entries."""
        keys, values = layer.keys, layer.values
        b, h, n, d = keys.shape
        red = Reduction.keep(kept.reshape(b * h, -1), n)
        m = kept.shape[-1]
        new_k = red.apply(keys.reshape(b * h, n, d)).reshape(b, h, m, d)
        new_v = red.apply(values.reshape(b * h, n, values.shape[-1])).reshape(b, h, m, values.shape[-1])
        valid = kept[:, 0] >= 0  # every head keeps the same count per sample
        slot_valid = None if bool(valid.all()) else valid
        return CompressedLayer(new_k.contiguous(), new_v.contiguous(), layer.get_seq_length(), kept, slot_valid)

    def slot_positions(self) -> Tensor:
        """Logical position ``[B, H_kv, P]`` of every physical slot (``-1`` for a padded slot)."""
        b, h = self.keys.shape[:2]
        tail = torch.arange(self.compressed_length, self.compressed_length + self.physical_length - self.compressed_slots,
                            device=self.keys.device)
        return torch.cat([self.kept.to(self.keys.device), tail.expand(b, h, -1)], dim=-1)

    def slot_rotary(self, tail: Tensor) -> Tensor:
        """Rotary position ``[B, H_kv, P]`` of every slot, given those of the appended entries ``tail`` [B, T]."""
        h = self.keys.shape[1]
        return torch.cat([self.rotary, tail[:, None, :].expand(-1, h, -1).to(self.rotary)], dim=-1)

    def recompress(self, kept: Tensor, state: Tensor | None = None) -> "CompressedLayer":
        """Keep ``kept`` [B, H_kv, M] physical slots (ascending, ``-1`` = padded) of this layer: decode-time eviction.

        ``state`` [B, H, P] (per query head) is gathered with the slots; the budget carries over.
        """
        b, h, p, _ = self.keys.shape
        red = Reduction.keep(kept.reshape(b * h, -1), p)
        m = kept.shape[-1]
        gather = lambda t: red.apply(t.reshape(b * h, p, t.shape[-1])).reshape(b, h, m, t.shape[-1]).contiguous()
        positions = self.slot_positions().gather(-1, kept.clamp_min(0)).masked_fill(kept < 0, -1)
        valid = kept[:, 0] >= 0
        new = CompressedLayer(gather(self.keys), gather(self.values), self.cumulative_length, positions,
                              None if bool(valid.all()) else valid)
        if state is not None:
            g = state.shape[1] // h
            idx = kept.repeat_interleave(g, dim=1)
            new.state = state.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, 0.0)
        new.budget, new.steps, new.position_shift = self.budget, self.steps, self.position_shift
        new.refiltered = self.refiltered
        return new

    # ------------------------------------------------------------------ Cache API
    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def needs_own_mask(self) -> bool:
        """Whether transformers' single mask per forward (or its positions) would be wrong for this layer."""
        return self.slot_valid is not None or not self.uniform or self.position_shift is not None

    def check_masked(self) -> None:
        """Raise if transformers' one mask per forward would be wrong for this layer and nobody builds its own."""
        if self.needs_own_mask and self.masked_by is None and self.is_initialized:
            why = ("its samples kept different numbers of entries (left-padded slots)" if self.slot_valid is not None
                   else "its entries carry in-cache positions (a rolling StreamingLLM cache), so new tokens need "
                   "shifted positions" if self.position_shift is not None
                   else "its layers hold different numbers of entries")
            raise StageError(
                f"this KV cache was compressed by tokenreduce and {why}; transformers builds one attention mask for "
                "all layers and would attend to the wrong entries. Continue decoding inside "
                "`with tokenreduce.apply(model, method):` (the attachment masks every layer itself and never "
                "re-compresses a compressed cache), or decode the samples one at a time")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.check_masked()
        if not self.is_initialized:  # after reset(): a fresh, uncompressed layer
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers asks the first full-attention layer before any layer runs: the earliest place to refuse
        self.check_masked()
        return self.physical_length + query_length, self.cumulative_length - self.physical_length

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = self.compressed_length = self.compressed_slots = self.steps = 0
        self.kept, self.slot_valid, self.uniform, self.state, self.budget = None, None, True, None, None
        self.rotary = self.position_shift = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.cumulative_length
        n = -tokens_to_remove
        if n <= 0:
            return
        appended = self.cumulative_length - self.compressed_length
        if n > appended:
            raise StageError(f"cannot crop {n} tokens from a compressed cache layer: only the {appended} tokens "
                             "appended after compression can be removed; the compressed entries are not in order")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        if self.state is not None:
            self.state = self.state[..., :-n]
        self.cumulative_length -= n

    def _index_batch(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.kept is not None:
            self.kept = fn(self.kept)
        for name in ("slot_valid", "state", "budget", "rotary", "position_shift"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._index_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # ------------------------------------------------------------------ masks
    def cache_validity(self, padding: Tensor | None) -> Tensor:
        """Which physical slots ``[B, P]`` are real, given the 2-D padding mask over logical positions."""
        b = self.keys.shape[0]
        comp = self.slot_valid if self.slot_valid is not None else torch.ones(
            b, self.compressed_slots, dtype=torch.bool, device=self.keys.device)
        tail_len = self.physical_length - self.compressed_slots
        if padding is None:
            tail = torch.ones(b, tail_len, dtype=torch.bool, device=self.keys.device)
        else:
            tail = padding[:, self.compressed_length:self.compressed_length + tail_len].to(torch.bool)
        return torch.cat([comp.to(self.keys.device), tail.to(self.keys.device)], dim=1)


def layer_mask(valid: Tensor, query_length: int) -> Tensor:
    """Boolean attention mask ``[B, 1, q, K]`` for one layer holding ``K`` entries, the last ``q`` new.

    ``valid`` [B, K]: real entries (compressed slots, appended tokens, the new tokens); each new
    token also sees only the new tokens up to itself.
    """
    k = valid.shape[1]
    q = query_length
    cols = torch.arange(k, device=valid.device)
    rows = torch.arange(q, device=valid.device)
    causal = cols[None, :] <= (k - q + rows)[:, None]  # [q, K]
    return valid[:, None, None, :] & causal[None, None]


def gather_mask(mask: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """A 4-D mask ``[B or 1, H, L, L]`` restricted to the rows and columns ``index`` [B, M] (``-1`` = padded slot).

    ``valid`` [B, M] marks the real slots: padded columns are masked and a padded row sees only
    itself (no empty softmax row). Bool masks stay bool (True attends); additive masks stay additive.
    Kept rows keep whatever structure the mask had (causal, bidirectional image blocks, windows).
    """
    b, m = index.shape
    h = mask.shape[1]
    i = index.clamp_min(0)
    rows = mask.expand(b, -1, -1, -1).gather(2, i[:, None, :, None].expand(-1, h, -1, mask.shape[-1]))
    out = rows.gather(3, i[:, None, None, :].expand(-1, h, m, -1))
    own = torch.eye(m, dtype=torch.bool, device=out.device)[None, None] & ~valid[:, None, :, None]
    if out.dtype == torch.bool:
        return (out & valid[:, None, None, :]) | own
    out = out.masked_fill(~valid[:, None, None, :], torch.finfo(out.dtype).min)
    return out.masked_fill(own, 0.0)
