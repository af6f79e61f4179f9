"""KV-cache stage: compress a causal LM's cache once, after the context is encoded (prefill).

How it attaches (all undone exactly by `DecoderAttachment.remove`):

* Each attention module is routed to `attend` (`runtime.routing`: the backbone keeps the
  original config, so transformers still builds the masks of the original implementation,
  SDPA or eager, and the chain ends in that implementation — the model never switches to
  eager). At prefill it first computes, from the post-RoPE queries and the keys after the
  cache update, only the softmax rows a method asked for (SnapKV's observation window,
  TOVA's last query).
* A forward pre-hook (with kwargs) on each attention module takes the cache
  (``past_key_values``) and decides whether this forward is a prefill to compress (query
  length > 1, a full-attention layer, not yet compressed); the budget is checked there,
  before the first layer touches the cache. A forward hook then scores that layer's cached
  entries, keeps the top ones (`core.kv.select_kept`) and replaces ``cache.layers[i]`` by a
  `core.kv.CompressedLayer` — the caller's cache object stays compressed after the context
  exits. Decoding steps (query length 1) and a cache already compressed are never touched.
* A forward pre-hook on the backbone keeps the 2-D padding mask of the call: once a cache
  holds compressed layers with per-sample budgets (left-padded batches) or layers of
  different lengths, our attention function builds each layer's mask itself
  (`core.kv.layer_mask`) instead of transformers' one mask per forward.

A family is described once (`families.decoders`). Sliding-window layers are left alone —
they already bound their cache — and a model without any full-attention layer is refused.
A forward that only gathers signals for another stage (GemFilter's filter pass,
`routing.probe_pass`) is ignored.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..core.errors import NeverFiredError, StageError
from ..core.kv import CompressedLayer, kv_bytes, layer_mask, select_kept
from ..core.method import DecoderInfo, KVContext, KVMethod, Signal
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, attention_modules, decoder_info, full_attention_layers
from ..scoring.attention import accumulated_attention, window_attention
from .kv_decode import evict_step, reposition, rope_for_repositioning
from .routing import check_implementation, is_probing, route


@dataclass
class _LayerState:
    """One attention module's view of the running forward (set by its pre-hook)."""

    cache: Cache | None
    compress: bool = False
    keep_all: bool = False  # a full-attention layer the method skips: kept whole, but held as a CompressedLayer
    valid: Tensor | None = None  # [B, N] real entries of the layer after this forward's update
    lengths: Tensor | None = None
    budgets: Tensor | None = None
    query: Tensor | None = None  # post-RoPE queries of this forward, the mask and scale its attention used
    mask: Tensor | None = None
    scaling: float | None = None
    evict: bool = False  # a decoding forward of a layer the method keeps at its budget
    row_valid: Tensor | None = None  # [B, q] real query rows of this forward
    accumulated: Tensor | None = None  # [B, H, K]
    step: int = 0  # t at the t-th decoding forward
    positions: Tensor | None = None  # [B, q] rotary positions of this forward's entries (repositioning methods)


class DecoderAttachment:
    """One kv-cache method attached to one causal LM."""

    def __init__(self, model: nn.Module, family: DecoderFamily, backbone: nn.Module, method: KVMethod):
        self.family, self.backbone, self.method = family, backbone, method
        config = backbone.config
        self.layers = list(family.layers(backbone))
        self.attns = attention_modules(family, backbone)
        impl = check_implementation(config, "kv-cache methods")  # the masks of padded, compressed caches
        full = full_attention_layers(family, backbone, "kv-cache methods")
        self.info = decoder_info(family, backbone, full)
        method.check(self.info)
        self.compressible = tuple(i for i in full if method.compresses(i))
        if not self.compressible:
            raise StageError(f"{method!r} compresses none of the full-attention layers {full} of this model")
        self.impl = impl
        self.stats = Stats()
        self._state: dict[int, _LayerState] = {}
        self._budgets: dict[int, Tensor] = {}  # per-layer budgets of the running prefill
        self.recording: dict[int, _LayerState] | None = None  # set by `prefill_once`: record, do not compress
        self.rope = rope_for_repositioning(family, backbone, full, self.compressible) if method.repositions else None
        self._padding: Tensor | None = None  # 2-D padding mask of the running forward (bool), None = no padding
        self._custom_mask = False  # the caller passed a ready 4-D mask
        self._has_compressed = False  # the running forward's cache already holds compressed layers
        self._flagged: "weakref.WeakSet[CompressedLayer]" = weakref.WeakSet()
        self._caches: "weakref.WeakSet[Cache]" = weakref.WeakSet()
        self._ran = False
        self._undo = Undo()
        self._backbone_sig = inspect.signature(backbone.forward)
        self._attach()

    # ------------------------------------------------------------------ attach / remove
    def _attach(self):
        try:
            for i, attn in enumerate(self.attns):
                route(attn, self, i, self._undo)
                h1 = attn.register_forward_pre_hook(partial(self._before_attention, i), with_kwargs=True)
                h2 = attn.register_forward_hook(partial(self._after_attention, i), with_kwargs=True)
                self._undo += [h1.remove, h2.remove]
            h3 = self.backbone.register_forward_pre_hook(self._begin, with_kwargs=True)
            h4 = self.backbone.register_forward_hook(self._end, with_kwargs=True)
            self._undo += [h3.remove, h4.remove]
        except Exception:
            self.remove()
            raise

    def remove(self):
        self._unflag()
        self._undo.run()

    def _unflag(self):
        for layer in list(self._flagged):
            layer.masked_by = None
        self._flagged = weakref.WeakSet()

    # ------------------------------------------------------------------ hooks
    def _begin(self, backbone, args, kwargs):
        if is_probing(backbone):
            return None
        self._unflag()
        self._state.clear()
        try:
            bound = self._backbone_sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        mask = bound.get("attention_mask")
        if mask is None and isinstance(bound.get("kwargs"), dict):
            mask = bound["kwargs"].get("attention_mask")
        self._custom_mask = isinstance(mask, Tensor) and mask.dim() == 4
        self._padding = None
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.all()):
            self._padding = mask.to(torch.bool)
        cache = bound.get("past_key_values")
        self._has_compressed = False
        shift = None
        if isinstance(cache, Cache):
            for layer in cache.layers:
                if isinstance(layer, CompressedLayer):  # we build its masks during this forward
                    layer.masked_by = self
                    self._flagged.add(layer)
                    self._has_compressed = True
                    if layer.position_shift is not None:
                        shift = layer.position_shift
        if self.rope is not None:
            return self._positions(bound, args, kwargs, cache, shift)

    def _positions(self, bound, args, kwargs, cache, shift):
        """In-cache positions (a repositioning method): keep transformers' positions of this forward, then
        lower them by the cache's shift, so new tokens continue right after the entries the cache holds."""
        if "position_ids" in bound and "position_ids" not in kwargs:
            raise StageError(f"{self.method!r} re-positions the cache and needs position_ids passed by keyword "
                             "(or not at all), as the causal LM and generate do")
        ids = bound.get("input_ids")
        ref = ids if isinstance(ids, Tensor) else bound.get("inputs_embeds")
        pos = kwargs.get("position_ids")
        if pos is None:  # what transformers would use
            past = cache.get_seq_length() if isinstance(cache, Cache) else 0
            pos = (torch.arange(ref.shape[1], device=ref.device) + past)[None]
        self._orig_positions = pos.expand(ref.shape[0], -1)
        if shift is not None:
            pos = self._orig_positions - shift.to(pos.device)[:, None]
            kwargs = dict(kwargs, position_ids=pos)
        self._cur_positions = pos.expand(ref.shape[0], -1)
        return args, kwargs

    def _end(self, backbone, args, kwargs, output):
        if is_probing(backbone):
            return output
        for cache in list(self._caches):
            mark_uniform(cache)
        self._caches = weakref.WeakSet()
        self._unflag()

    def _before_attention(self, index: int, module, args, kwargs):
        if is_probing(self.backbone):
            self._state.pop(index, None)
            return
        self._ran = True
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch, q = hidden.shape[0], hidden.shape[1]
        cache = kwargs.get("past_key_values")
        st = _LayerState(cache)
        self._state[index] = st
        li = module.layer_idx
        layer = cache.layers[li] if isinstance(cache, Cache) and li < len(cache.layers) else None
        m = self.method
        if index not in self.info.compressible or m.reduces_nothing:
            return
        if isinstance(layer, CompressedLayer) and layer.state is not None and m.evicts_during_decode \
                and index in self.compressible:  # decoding under a budget: append, attend, evict back to it
            st.evict, st.step = True, layer.steps + 1
            if self.rope is not None:
                st.positions = self._cur_positions
            st.row_valid = self._row_validity(batch, layer.get_seq_length() + q, q, hidden.device)
            return
        past = layer.get_seq_length() if layer is not None and layer.is_initialized else 0
        evicting = m.evicts_during_decode and index in self.compressible
        if evicting and (isinstance(layer, CompressedLayer) or (past and (q <= 1 or m.accumulates))):
            raise StageError(f"{m!r} holds the cache at its budget from the prefill on, scoring every entry by the "
                             f"attention it received, but layer {li} already holds {past} entries that were cached "
                             f"outside this attachment{' (and compressed)' if isinstance(layer, CompressedLayer) else ''}"
                             "; run the whole prompt inside `with tokenreduce.apply(model, method):` (generate inside "
                             "the block does this) on an empty cache")
        if q <= 1 and not (evicting and past == 0):  # a 1-token prompt is the prefill of an evicting method
            return
        if cache is None:
            raise StageError(f"{m!r} compresses the KV cache, but this forward runs without one; call the model "
                             "with use_cache=True (the default) or pass past_key_values=DynamicCache()")
        if isinstance(layer, CompressedLayer):
            return  # a cache is compressed once, at its prefill; later chunks (a question) are appended as they are
        _check_cache(cache, layer)
        if self.rope is not None:
            if past:
                raise StageError(f"{m!r} re-positions the cache at its prefill and needs the whole prompt in one "
                                 f"forward on an empty cache; this layer already holds {past} entries")
            st.positions = self._cur_positions
        st.valid = self._validity(kwargs.get("attention_mask"), batch, past + q, hidden.device)
        st.lengths = st.valid.sum(-1)
        if index == self.info.compressible[0]:  # every layer's budget, before the first layer touches the cache
            self._budgets = {i: m.layer_budgets(st.lengths, i, self.info) for i in self.compressible}
            self.stats = Stats(batch_size=batch)
            m.begin_prefill()
        if index not in self.compressible:
            st.keep_all, st.budgets = True, st.lengths
            return
        st.budgets = self._budgets.get(index)
        if st.budgets is None:  # the first compressible layer did not run in this forward (a truncated model)
            st.budgets = m.layer_budgets(st.lengths, index, self.info)
        st.compress = True

    def _row_validity(self, batch: int, length: int, q: int, device) -> Tensor:
        """Real query rows [B, q] of a forward that ends at logical ``length``."""
        if self._padding is not None and self._padding.shape[1] == length:
            return self._padding[:, length - q:].to(device)
        return torch.ones(batch, q, dtype=torch.bool, device=device)

    def _validity(self, mask4d, batch: int, length: int, device) -> Tensor:
        """Real (non-padding) entries [B, length] of a layer holding ``length`` uncompressed entries."""
        if self._padding is not None and self._padding.shape[1] == length:
            return self._padding.to(device)
        if isinstance(mask4d, Tensor) and mask4d.dim() == 4 and mask4d.shape[-1] == length:
            row = mask4d[:, 0, -1, :]  # the last query sees every real entry before it
            return row if row.dtype == torch.bool else row == 0
        if self._padding is not None or self._custom_mask:
            raise StageError(f"the attention mask does not cover the {length} cached entries of this layer; pass a "
                             "2-D attention_mask over the whole sequence (past and new tokens)")
        return torch.ones(batch, length, dtype=torch.bool, device=device)

    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        """Our layers' link of the attention chain: own masks, the rows scoring needs, then the rest of the chain."""
        st = self._state.get(index)
        if is_probing(self.backbone):
            return proceed(query, key, value, attention_mask, **kwargs)
        mask = attention_mask
        if st is not None and self._has_compressed and isinstance(st.cache, Cache) and index in self.info.compressible:
            mask = self._own_mask(module, query, key, mask, st.cache.layers[module.layer_idx])
        if st is not None and (st.compress or self.recording is not None):  # scored after the layer, from these
            st.query, st.mask, st.scaling = query, mask, kwargs.get("scaling")
        if st is not None and st.evict and self.method.accumulates:
            st.accumulated = accumulated_attention(query, key, mask, kwargs.get("scaling"), st.row_valid,
                                                   partial(self.method.row_weights, step=st.step))
        return proceed(query, key, value, mask, **kwargs)

    def _own_mask(self, module, query, key, mask, layer):
        """This layer's own mask when the cache's layout differs from what transformers' one mask assumes."""
        q, k = query.shape[-2], key.shape[-2]
        if isinstance(layer, CompressedLayer):
            valid = layer.cache_validity(self._padding)
        elif self._padding is not None:
            valid = self._padding[:, :k]
        else:
            valid = torch.ones(key.shape[0], k, dtype=torch.bool, device=key.device)
        if valid.shape[1] != k:
            raise StageError(f"layer {module.layer_idx}: the padding mask covers {valid.shape[1]} of its {k} entries; "
                             "pass a 2-D attention_mask over the whole sequence (past and new tokens)")
        if self._custom_mask:
            if mask is not None and mask.shape[-1] == k and not (isinstance(layer, CompressedLayer) and layer.needs_own_mask):
                return mask
            raise StageError("a custom 4-D attention mask cannot follow a compressed cache with per-sample or per-layer "
                             "lengths; pass a 2-D padding mask instead")
        if bool(valid.all()):
            if q == 1:
                return None  # what transformers passes for an unpadded decoding step
            if mask is not None and mask.shape[-1] == k:
                return mask  # transformers' own mask already fits this layer
        own = layer_mask(valid, q)
        if self.impl == "eager":
            own = torch.zeros(own.shape, dtype=query.dtype, device=own.device).masked_fill(~own, torch.finfo(query.dtype).min)
        return own

    def _after_attention(self, index: int, module, args, kwargs, output):
        if is_probing(self.backbone):
            return output
        st = self._state.pop(index, None)
        if st is not None and st.evict:
            self._evict(index, st, module.layer_idx)
        if st is None or not (st.compress or st.keep_all):
            return output
        cache, li = st.cache, module.layer_idx
        layer = cache.layers[li]
        if st.valid.shape[1] != layer.keys.shape[-2]:
            raise StageError(f"layer {li} holds {layer.keys.shape[-2]} entries after prefill, expected {st.valid.shape[1]}")
        if self.recording is not None:  # prefill once for several methods: keep what scoring needs, compress nothing
            self.recording[index] = st
            return output
        new, rows = compress_layer(self.method, self.info, index, layer, st, keep_all=st.keep_all)
        if self.rope is not None:
            kept = new.kept
            reposition(new, st.positions.gather(1, kept.clamp_min(0).flatten(1)).view_as(kept), self.rope,
                       self._orig_positions[:, -1] + 1, self.method)
        new.masked_by = self  # this forward goes on with our masks
        self._flagged.add(new)
        cache.layers[li] = new
        self._caches.add(cache)
        record_compression(self.stats, self.method, self.info, li, layer, new, st, rows)
        return output

    def _evict(self, index: int, st: _LayerState, li: int) -> None:
        """After a decoding forward: add its attention to the slots' scores and evict back to the budget."""
        cache = st.cache
        new = evict_step(self.method, self.info, index, cache.layers[li], st.accumulated, self._padding, st.step,
                         self.rope, st.positions, None if self.rope is None else self._orig_positions[:, -1] + 1)
        if new is None:
            return
        new.masked_by = self
        self._flagged.add(new)
        cache.layers[li] = new
        self._caches.add(cache)
        s = self.stats
        s.kv_decode_steps = max(s.kv_decode_steps, st.step)
        s.kv_decode_slots = max(s.kv_decode_slots, new.physical_length)

    def check_ran(self):
        """Called after the model's forward: its decoder layers must have run through our modules."""
        if not self._ran:
            raise NeverFiredError(f"the model ran but the {self.info.family} decoder's attention modules did not, so "
                                  f"{self.method.name} never fired; call the causal LM (or its decoder) the method is "
                                  "attached to")
        self._ran = False


def compress_layer(method: KVMethod, info: DecoderInfo, index: int, layer: DynamicLayer, st: _LayerState,
                   keep_all: bool = False, memo: dict | None = None) -> tuple[CompressedLayer, int]:
    """``layer`` at the end of a prefill, compressed by ``method``: (the new layer, window rows scored).

    ``st`` holds the prefill's real entries, budgets, and the post-RoPE queries, mask and scale
    its attention used; the method's signals (window rows, accumulated attention) are computed
    here from those and the layer's keys. ``keep_all``: a layer the method skips, kept whole.
    ``memo``: accumulated attention already computed for this layer, by `KVMethod.accumulation_key`.
    """
    keys, values = layer.keys, layer.values
    b, h, n = keys.shape[:3]
    valid = st.valid
    rank = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
    rows = 0
    accumulated = None
    if keep_all:  # everything real, in order (only columns that are padding in every sample go)
        scores = torch.arange(n, device=keys.device, dtype=torch.float32)[None, None]
    else:
        # a window longer than this forward's queries (a prompt continued from a cache filled earlier, in a chunk
        # shorter than the window) uses the queries the forward has
        wants_rows = bool({Signal.WINDOW_ATTN, Signal.LAST_QUERY_ATTN} & set(method.signals))
        window_rows = torch.tensor([method.query_rows(int(x)) if wants_rows else 0 for x in st.lengths.tolist()],
                                   dtype=torch.long)
        window_rows = window_rows.clamp(max=st.query.shape[-2])
        rows = int(window_rows.max())
        window = window_attention(st.query, keys, st.mask, st.scaling, rows) if rows > 0 else None
        if method.accumulates:
            key = method.accumulation_key()
            accumulated = memo.get(key) if memo is not None else None
            if accumulated is None:
                q = st.query.shape[-2]
                accumulated = accumulated_attention(st.query, keys, st.mask, st.scaling, valid[:, n - q:],
                                                    partial(method.row_weights, step=0))
                if memo is not None:
                    memo[key] = accumulated
        ctx = KVContext(layer=index, keys=keys, values=values, valid=valid, rank=rank, lengths=st.lengths,
                        budgets=st.budgets, window=window, window_rows=window_rows, info=info, accumulated=accumulated)
        scores = method.score(ctx)
    kept = select_kept(scores.expand(b, h, n), valid, torch.minimum(st.budgets, st.lengths))
    new = CompressedLayer.compress(layer, kept)
    if method.evicts_during_decode and not keep_all:  # carry the accumulated scores into decoding
        idx = kept.repeat_interleave(info.num_groups, dim=1)
        new.state = (accumulated.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, 0.0) if accumulated is not None
                     else torch.zeros(idx.shape, dtype=torch.float32, device=keys.device))
        new.budget = st.budgets.clone()
    return new, rows


def record_compression(s: Stats, method: KVMethod, info: DecoderInfo, li: int, before: DynamicLayer,
                       after: CompressedLayer, st: _LayerState, rows: int) -> None:
    """Add one compressed layer to ``s`` (what it kept, its bytes, the scoring FLOPs)."""
    s.kv_layers.append(li)
    s.kv_entries_per_layer.append(float(st.lengths.float().mean()))
    s.kv_kept_per_layer.append(float(torch.minimum(st.budgets, st.lengths).float().mean()))
    s.kv_slots_per_layer.append(after.physical_length)
    s.kv_bytes_before_per_layer.append(kv_bytes(before))
    s.kv_bytes_after_per_layer.append(kv_bytes(after))
    if st.compress:
        s.scoring_flops += method.scoring_flops(int(st.lengths.float().mean()), rows, info)


def _check_cache(cache: Cache, layer) -> None:
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise StageError(f"kv-cache methods compress a DynamicCache (transformers' default, not offloaded); got "
                         f"{type(cache).__name__}{' with offloading' if getattr(cache, 'offloading', False) else ''}. "
                         "StaticCache, QuantizedCache and offloaded caches are not supported: pass "
                         "past_key_values=DynamicCache() or let the model create its cache")
    if layer is not None and type(layer) is not DynamicLayer:
        raise StageError(f"kv-cache methods compress full-attention DynamicLayer cache layers; this cache holds a "
                         f"{type(layer).__name__} at this layer")


def mark_uniform(cache: Cache) -> None:
    """Flag the compressed layers of ``cache`` whose physical length differs from another full layer's."""
    lengths = {l.keys.shape[-2] for l in cache.layers
               if isinstance(l, DynamicLayer) and not getattr(l, "is_sliding", False) and l.is_initialized}
    for l in cache.layers:
        if isinstance(l, CompressedLayer):
            l.uniform = len(lengths) <= 1
