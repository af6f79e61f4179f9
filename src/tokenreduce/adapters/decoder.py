"""KV-cache stage: compress a causal LM's cache once, after the context is encoded (prefill).

How it attaches (all undone exactly by `DecoderAttachment.remove`):

* Each attention module gets the ``"tokenreduce"`` attention function of transformers'
  registry (the one `adapters.encoder` registers; it dispatches on the module's slot
  attribute, so encoder and decoder attachments coexist) through an instance-level copy of
  its config whose ``_attn_implementation`` is ``"tokenreduce"``. The backbone keeps the
  original config, so transformers still builds the masks of the original implementation
  (SDPA or eager), and our function calls that implementation — the model never switches to
  eager. At prefill it first computes, from the post-RoPE queries and the keys after the
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

A family is described once (`DecoderFamily`): backbone class, attention class, where the
layers are. Which layers are full attention comes from the config's layer types
(transformers' own ``get_layer_types_and_kwargs``): sliding-window layers (Mistral with
``sliding_window`` set, Qwen2 with ``use_sliding_window``) are left alone — they already
bound their cache — and a model without any full-attention layer is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from ..core.undo import Undo
from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.kv import CompressedLayer, kv_bytes, layer_mask, select_kept
from ..core.method import DecoderInfo, EvictionContext, KVContext, KVMethod
from ..core.stats import Stats
from .encoder import _SLOT, IMPL, _original

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


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

DECODER_FAMILIES: tuple[DecoderFamily, ...] = (LLAMA, QWEN2, QWEN3, MISTRAL, PHI3, GEMMA3)
SUPPORTED_DECODERS = "Llama (SmolLM2), Qwen2, Qwen3, Mistral, Phi3, Gemma3 (*ForCausalLM or the bare *Model)"


def attention_modules(family: DecoderFamily, backbone: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order, checked against the family's classes."""
    attns = [family.attention(layer) for layer in family.layers(backbone)]
    for a in attns:
        if type(a).__name__ not in family.attention_classes:
            raise UnsupportedModelError(f"{family.name}: expected {family.attention_classes} attention modules, "
                                        f"found {type(a).__name__}")
    return attns


def check_implementation(config, who: str) -> str:
    """The model's attention implementation, if our attention function can wrap it (else a clear refusal)."""
    impl = config._attn_implementation
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModelError(f"{who} run(s) with attn_implementation in {SUPPORTED_IMPLEMENTATIONS}; this model "
                                    f"uses {impl!r}: load it with attn_implementation='sdpa'")
    return impl


def route_attention(attn: nn.Module, owner, index: int, impl: str, undo: Undo) -> None:
    """Send ``attn`` through the shared "tokenreduce" attention function, to ``owner.attend(index, ...)``.

    Only this module sees an instance-level config copy naming "tokenreduce"; the backbone keeps
    the original config, so transformers still builds the masks of ``impl``. Undone by ``undo``.
    """
    if _SLOT in attn.__dict__:
        raise StageError("this model already has tokenreduce methods attached; pass all methods to one apply()")
    undo.set_instance_attr(attn, _SLOT, (owner, index))
    undo.set_instance_attr(attn, "_tokenreduce_impl", impl)
    cfg = copy.copy(attn.config)  # shallow
    cfg._attn_implementation_internal = IMPL
    undo.set_instance_attr(attn, "config", cfg)


def find_decoder(model: nn.Module) -> tuple[DecoderFamily, nn.Module]:
    """(family, backbone) of the one supported causal-LM decoder inside ``model``."""
    found = []
    for module in model.modules():
        for fam in DECODER_FAMILIES:
            if type(module).__name__ in fam.backbone_classes:
                found.append((fam, module))
    if not found:
        raise UnsupportedModelError(f"no supported causal-LM decoder found in {type(model).__name__}; kv-cache methods "
                                    f"support {SUPPORTED_DECODERS}")
    if len(found) > 1:
        raise UnsupportedModelError(f"{type(model).__name__} holds {len(found)} decoders; attach to one of them")
    return found[0]


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
        layer_types = get_layer_types_and_kwargs(config)[0]
        full = tuple(i for i, t in enumerate(layer_types) if t == "full_attention")
        if not full:
            raise UnsupportedModelError(
                f"every layer of this {family.name} model is a {layer_types[0]!r} layer (sliding_window="
                f"{getattr(config, 'sliding_window', None)}); kv-cache methods leave sliding-window layers alone "
                "(they already bound their cache), so there is nothing to compress")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.info = DecoderInfo(
            family=family.name, num_layers=len(self.layers), num_heads=heads, num_kv_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size, compressible=full,
        )
        method.check(self.info)
        self.compressible = tuple(i for i in full if method.compresses(i))
        if not self.compressible:
            raise StageError(f"{method!r} compresses none of the full-attention layers {full} of this model")
        self.impl = impl
        self.stats = Stats()
        self._state: dict[int, _LayerState] = {}
        self._budgets: dict[int, Tensor] = {}  # per-layer budgets of the running prefill
        self.recording: dict[int, _LayerState] | None = None  # set by `prefill_once`: record, do not compress
        self.rope = _rope_for_repositioning(family, backbone, full, self.compressible) if method.repositions else None
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
                route_attention(attn, self, i, self.impl, self._undo)
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
        for cache in list(self._caches):
            _mark_uniform(cache)
        self._caches = weakref.WeakSet()
        self._unflag()

    def _before_attention(self, index: int, module, args, kwargs):
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
        if q <= 1:
            return
        if cache is None:
            raise StageError(f"{m!r} compresses the KV cache, but this forward runs without one; call the model "
                             "with use_cache=True (the default) or pass past_key_values=DynamicCache()")
        if isinstance(layer, CompressedLayer):
            return  # a cache is compressed once, at its prefill; later chunks (a question) are appended as they are
        _check_cache(cache, layer)
        past = layer.get_seq_length() if layer is not None and layer.is_initialized else 0
        if self.rope is not None:
            if past:
                raise StageError(f"{m!r} re-positions the cache at its prefill and needs the whole prompt in one "
                                 "forward on an empty cache; this layer already holds {past} entries")
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

    def attend(self, index, module, query, key, value, attention_mask, **kwargs):
        """The "tokenreduce" attention function for our layers: own masks, window rows, then the original."""
        impl = _original(module, module.__dict__["_tokenreduce_impl"])
        st = self._state.get(index)
        mask = attention_mask
        if st is not None and self._has_compressed and isinstance(st.cache, Cache) and index in self.info.compressible:
            mask = self._own_mask(module, query, key, mask, st.cache.layers[module.layer_idx])
        if st is not None and (st.compress or self.recording is not None):  # scored after the layer, from these
            st.query, st.mask, st.scaling = query, mask, kwargs.get("scaling")
        if st is not None and st.evict and self.method.accumulates:
            st.accumulated = accumulated_attention(query, key, mask, kwargs.get("scaling"), st.row_valid,
                                                   partial(self.method.row_weights, step=st.step))
        return impl(module, query, key, value, mask, **kwargs)

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
                       self._orig_positions[:, -1] + 1)
        new.masked_by = self  # this forward goes on with our masks
        self._flagged.add(new)
        cache.layers[li] = new
        self._caches.add(cache)
        record_compression(self.stats, self.method, self.info, li, layer, new, st, rows)
        return output

    def _evict(self, index: int, st: _LayerState, li: int) -> None:
        """After a decoding forward: add its attention to the slots' scores and evict back to the budget."""
        cache = st.cache
        layer = cache.layers[li]
        p, b = layer.physical_length, layer.keys.shape[0]
        old = layer.state
        state = torch.cat([old, old.new_zeros(*old.shape[:2], p - old.shape[-1])], dim=-1)
        if st.accumulated is not None:
            state = state + st.accumulated
        valid = layer.cache_validity(self._padding)
        layer.steps = st.step
        budget = torch.minimum(layer.budget.to(valid.device), valid.sum(-1))
        if bool((valid.sum(-1) <= budget).all()) and self.rope is None:
            layer.state = state
            return
        position = layer.slot_positions()
        age = torch.where(position >= 0, layer.cumulative_length - 1 - position, torch.iinfo(torch.long).max)
        ctx = EvictionContext(layer=index, state=state, age=age, valid=valid, budgets=budget, step=st.step,
                              info=self.info)
        scores = self.method.evict_score(ctx)
        kept = select_kept(scores.expand(b, layer.keys.shape[1], p), valid, budget)
        new = layer.recompress(kept, state)
        if self.rope is not None:
            rotary = layer.slot_rotary(st.positions).gather(-1, kept.clamp_min(0))
            reposition(new, rotary, self.rope, self._orig_positions[:, -1] + 1)
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
        window_rows = torch.tensor([method.query_rows(int(x)) for x in st.lengths.tolist()], dtype=torch.long)
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
    kept = select_kept(scores.expand(b, h, n), valid, st.budgets)
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
    s.kv_kept_per_layer.append(float(st.budgets.float().mean()))
    s.kv_slots_per_layer.append(after.physical_length)
    s.kv_bytes_before_per_layer.append(kv_bytes(before))
    s.kv_bytes_after_per_layer.append(kv_bytes(after))
    if st.compress:
        s.scoring_flops += method.scoring_flops(int(st.lengths.float().mean()), rows, info)


@dataclass(frozen=True)
class Rope:
    """A model's rotary embedding, enough to move a cached (rotated) key to another position."""

    inv_freq: Tensor  # [rot_dim / 2]


def _rope_for_repositioning(family: DecoderFamily, backbone: nn.Module, full: tuple[int, ...],
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


def reposition(layer: CompressedLayer, rotary: Tensor, rope: Rope, next_position: Tensor) -> None:
    """Give the real slots of ``layer`` positions 0..m-1 in slot order (StreamingLLM's in-cache positions).

    ``rotary`` [B, H, P]: the position each slot's key carries now; ``next_position`` [B]: the
    position transformers would give the next token. Keys that move are re-rotated; the layer
    remembers its slots' positions and how far the next tokens' positions must be lowered.
    """
    real = layer.kept >= 0
    target = real.long().cumsum(-1) - 1
    delta = torch.where(real, target - rotary, 0)
    if bool((delta != 0).any()):
        layer.keys = rotate_keys(layer.keys, delta, rope)
    layer.rotary = torch.where(real, target, 0)
    count = real[:, 0].sum(-1)  # real entries per sample (every head holds as many)
    layer.position_shift = next_position.to(count.device) - count


class _Recorder(KVMethod):
    """The method `prefill_once` attaches: every full-attention layer recorded, nothing compressed."""

    name, paper = "record", "-"

    def score(self, ctx: KVContext) -> Tensor:
        raise AssertionError("a recording prefill compresses nothing")


def prefill_once(model: nn.Module, input_ids: Tensor, methods: list[KVMethod], attention_mask: Tensor | None = None,
                 **kwargs) -> tuple[object, list[tuple[DynamicCache, Stats, float]]]:
    """Prefill ``input_ids`` once; return the forward's output and, per method, the compressed cache, its
    stats and the seconds its compression took (scoring included; the shared forward excluded).

    Each cache is what the method's own prefill inside ``tokenreduce.apply`` leaves (the same
    entries, bit for bit): compression acts on each layer's cache after its attention, so the
    hidden states of a prefill do not depend on the method and one forward serves them all.
    The caches share no tensors that decoding writes to; continue each one inside
    ``apply(model, its method)`` (decode-time eviction needs the attachment). A benchmark
    tool: the queries of every layer are held until the end (``B H N D`` floats per layer).
    """
    for m in methods:
        if not isinstance(m, KVMethod):
            raise StageError(f"prefill_once takes kv-cache methods; got {m!r}")
        if m.repositions or getattr(m, "retrieval", False):
            raise StageError(f"{m!r} re-positions or retrieves from the cache while decoding; prefill it inside "
                             "tokenreduce.apply")
    family, backbone = find_decoder(model)
    att = DecoderAttachment(model, family, backbone, _Recorder(keep_count=1))
    att.recording = {}
    full = DynamicCache(config=backbone.config)
    try:
        out = model(input_ids, attention_mask=attention_mask, past_key_values=full, **kwargs)
    finally:
        att.remove()
    info, recorded = att.info, att.recording
    if not recorded:
        raise NeverFiredError("the recording prefill ran no full-attention layer of the decoder")
    results = []
    first = recorded[min(recorded)]
    memos: dict[int, dict] = {li: {} for li in recorded}  # accumulated attention shared by methods that agree on it
    for m in methods:
        m.check(info)
        mine = tuple(i for i in info.compressible if m.compresses(i))
        budgets = {i: m.layer_budgets(first.lengths, i, info) for i in mine}
        t0 = time.perf_counter()
        m.begin_prefill()
        cache = DynamicCache(config=backbone.config)
        stats = Stats(batch_size=input_ids.shape[0])
        layers = []
        for li, layer in enumerate(full.layers):
            st = recorded.get(li)
            if st is None:  # a sliding-window layer: shared tensors are replaced, never written, by decoding
                layers.append(copy.copy(layer))
                continue
            keep_all = li not in mine
            plan = dataclasses.replace(st, budgets=st.lengths if keep_all else budgets[li], compress=not keep_all,
                                       keep_all=keep_all)
            new, rows = compress_layer(m, info, li, layer, plan, keep_all=keep_all, memo=memos[li])
            record_compression(stats, m, info, li, layer, new, plan, rows)
            layers.append(new)
        cache.layers = layers
        _mark_uniform(cache)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        results.append((cache, stats, time.perf_counter() - t0))
    return out, results


def _check_cache(cache: Cache, layer) -> None:
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise StageError(f"kv-cache methods compress a DynamicCache (transformers' default, not offloaded); got "
                         f"{type(cache).__name__}{' with offloading' if getattr(cache, 'offloading', False) else ''}. "
                         "StaticCache, QuantizedCache and offloaded caches are not supported: pass "
                         "past_key_values=DynamicCache() or let the model create its cache")
    if layer is not None and type(layer) is not DynamicLayer:
        raise StageError(f"kv-cache methods compress full-attention DynamicLayer cache layers; this cache holds a "
                         f"{type(layer).__name__} at this layer")


def _mark_uniform(cache: Cache) -> None:
    """Flag the compressed layers of ``cache`` whose physical length differs from another full layer's."""
    lengths = {l.keys.shape[-2] for l in cache.layers
               if isinstance(l, DynamicLayer) and not getattr(l, "is_sliding", False) and l.is_initialized}
    for l in cache.layers:
        if isinstance(l, CompressedLayer):
            l.uniform = len(lengths) <= 1


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
        w = weights(_row_logits(query, key[..., :seen, :], None if mask is None else mask[..., :seen], scaling,
                                lo, hi, k_total=k))
        if padded:
            w = torch.nan_to_num(w, nan=0.0).masked_fill(~row_valid[:, None, lo:hi, None].to(w.device), 0.0)
        part = w.sum(2)
        if total is None:
            total = part.new_zeros(*part.shape[:-1], k)
        total[..., :seen] += part
    return total


def _row_logits(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None, lo: int, hi: int,
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
    return _row_logits(query, key, mask, scaling, query.shape[-2] - rows, query.shape[-2]).softmax(-1)
