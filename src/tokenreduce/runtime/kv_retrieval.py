"""KV-cache stage, retrieval at decode time: keep the whole cache, attend over a retrieved subset.

A retrieval method (A²ATS) never evicts: the full K/V cache stays (in the paper's system, in
host memory); at every decoding step a cheap approximate score over *all* cached keys picks,
per KV head, the entries the step attends to exactly. This module is the attachment; the
scoring (codes, codebooks, the selection rule) belongs to the method (`methods.a2ats`).

How it attaches (all undone exactly by `KVRetrievalAttachment.remove`):

* Each full-attention module is routed to `attend` (`runtime.routing`); the backbone keeps the
  original config, so transformers builds the masks of the original implementation (SDPA or
  eager) and the chain ends in that implementation for the exact attention.
  Sliding-window layers are left alone (they bound their cache already).
* A forward pre-hook (with kwargs) on each attention module takes the RoPE ``(cos, sin)`` of
  the running forward and its cache. Pre-RoPE keys: the attention function receives the
  rotated keys; we **un-rotate** the new ones (the exact inverse rotation with the same
  ``cos``/``sin``, so any RoPE scaling and partial rotary dims are handled) instead of
  re-running ``k_proj`` (which would miss Qwen3's k-norm and Phi3's fused projection). The
  un-rotated keys are encoded once, when they enter the cache (prefill or decode), and the
  codes are kept per cache layer (weakly, by the method: nothing is added to the cache or the
  model), aligned with its slots; a cache cropped from the end keeps its codes' prefix.
* Forwards with more than one query (prefill, a chunk of question) attend exactly, as the
  model; a decoding step (one query) scores every cached key from its code, lets the method
  select per KV head, gathers the selected K/V and calls the original implementation on
  them (`attend_selected`). When the selection is every real entry the original call is made
  unchanged (bit-identical to the plain model).

Where tensors live (the paper's heterogeneous architecture, reference code
``VQCacheOffload``): the full K/V cache on the **host**; codes, codebooks and Cholesky
factors on the **device**, where the approximate scores and the top-k are computed; the host
attends over the selected entries (the query goes to the host, the attention output comes
back). This machine has no accelerator, so both sides are CPU memory here:
`RetrievalStats.placement` reports the bytes each side *would* hold and the per-step
transfers as figures computed from tensor sizes, not measured.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, attention_modules, decoder_info, find_decoder, full_attention_layers
from ..scoring.rope import rotate, unrotate
from .routing import check_implementation, route


# ---------------------------------------------------------------------------- exact attention over a subset
def gather_selected(selected: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Selected entries ``(keys, values, slot_valid)``: ``[B, H_kv, M, D]`` ×2 and ``[B, H_kv, M]``.

    ``selected`` [B, H_kv, K] bool. Each (sample, KV head) keeps its entries in their original
    order; ``M`` is the largest count, shorter rows are padded at the end (``slot_valid``).
    """
    counts = selected.sum(-1)
    m = max(int(counts.max()), 1)
    # the j-th selected position goes to slot j (slot m collects the rest and is dropped)
    slot = torch.where(selected, selected.long().cumsum(-1) - 1, m)
    pos = torch.arange(selected.shape[-1], device=key.device).expand(selected.shape)
    idx = torch.zeros(*selected.shape[:-1], m + 1, dtype=torch.long, device=key.device).scatter_(-1, slot, pos)[..., :m]
    slot_valid = torch.arange(m, device=key.device) < counts[..., None]
    k = key.gather(2, idx[..., None].expand(*idx.shape, key.shape[-1]))
    v = value.gather(2, idx[..., None].expand(*idx.shape, value.shape[-1]))
    return k, v, slot_valid


def attend_selected(impl: Callable, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, selected: Tensor,
                    eager: bool, **kwargs):
    """The original attention ``impl`` for one decoding query over the ``selected`` [B, H_kv, K] entries only."""
    k, v, slot_valid = gather_selected(selected, key, value)
    mask = None
    if not bool(slot_valid.all()):
        g = query.shape[1] // key.shape[1]
        mask = slot_valid.repeat_interleave(g, dim=1)[:, :, None, :]  # [B, H, 1, M]: KV head h // g, as repeat_kv
        if eager:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    return impl(module, query, k, v, mask, **kwargs)


# ---------------------------------------------------------------------------- stats
@dataclass
class RetrievalStats(Stats):
    """What the decoding steps since the last prefill attended to, and where the tensors would live.

    ``attended``: entries attended per (layer, sample, KV head) and step, mean (sink + window +
    retrieved, the GQA union); ``context``: real cache entries, mean. ``placement``: bytes per
    side at the last decoding step — *computed* from tensor sizes (this CPU-only machine keeps
    both sides in host memory), see `KVRetrievalAttachment`.
    """

    attended_sum: float = 0.0
    context_sum: float = 0.0
    samples: int = 0  # (step, layer, sample, KV head) tuples summed above
    placement: dict = field(default_factory=dict)

    @property
    def attended(self) -> float:
        return self.attended_sum / self.samples if self.samples else 0.0

    @property
    def context(self) -> float:
        return self.context_sum / self.samples if self.samples else 0.0

    @property
    def attended_fraction(self) -> float:
        return self.attended_sum / self.context_sum if self.context_sum else 1.0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "kv_decode_steps": self.kv_decode_steps, "attended": self.attended,
                "context": self.context, "attended_fraction": self.attended_fraction, "placement": self.placement}


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---------------------------------------------------------------------------- the attachment
@dataclass
class _Step:
    """One attention module's view of the running forward (set by its pre-hook)."""

    cos: Tensor
    sin: Tensor
    cache: Cache | None


class _Routed:
    """Full-attention modules of one decoder routed to ``attend`` (config copy + pre-hooks), undone exactly."""

    def __init__(self, model: nn.Module, family: DecoderFamily, backbone: nn.Module):
        self.family, self.backbone = family, backbone
        config = backbone.config
        self.impl = check_implementation(config, "retrieval attention")
        attns = attention_modules(family, backbone)
        self.full = full_attention_layers(family, backbone, "retrieval methods")
        self.info = decoder_info(family, backbone, self.full)
        self.attns = [attns[i] for i in self.full]  # index k of the routed modules = full layer self.full[k]
        self.rotary = getattr(backbone, "rotary_emb", None)
        if self.rotary is None:
            raise UnsupportedModelError(f"{family.name}: no rotary embedding found on the backbone; retrieval attention "
                                        "needs RoPE (windowed RoPE rotates the query to a fixed position)")
        self._step: dict[int, _Step] = {}
        self._ran = False
        self._undo = Undo()

    def route(self):
        try:
            for k, attn in enumerate(self.attns):
                route(attn, self, k, self._undo)
                h = attn.register_forward_pre_hook(partial(self._before_attention, k), with_kwargs=True)
                self._undo.append(h.remove)
            h = self.backbone.register_forward_pre_hook(self._begin, with_kwargs=True)
            self._undo.append(h.remove)
        except Exception:
            self.remove()
            raise

    def remove(self):
        self._undo.run()
        self._step.clear()

    def _begin(self, backbone, args, kwargs):
        self._step.clear()

    def _before_attention(self, k: int, module, args, kwargs):
        self._ran = True
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        if pe is None:
            raise StageError(f"{self.family.name}: the attention module got no position_embeddings (cos, sin); "
                             "retrieval attention needs the model's RoPE")
        self._step[k] = _Step(pe[0], pe[1], kwargs.get("past_key_values"))

    def wrope(self, position: int, dtype, device) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` [1, 1, r] of the fixed position windowed RoPE rotates decoding queries to."""
        x = torch.zeros(1, dtype=torch.float32, device=device)
        extra = {}
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:  # Gemma 3: one RoPE per layer type
            extra["layer_type"] = "full_attention"  # retrieval runs on the full-attention layers only
        cos, sin = self.rotary(x, torch.tensor([[position]], device=device), **extra)
        return cos.to(dtype), sin.to(dtype)

    def check_ran(self):
        if not self._ran:
            raise NeverFiredError(f"the model ran but the {self.family.name} decoder's attention modules did not; call "
                                  "the causal LM (or its decoder) the method is attached to")
        self._ran = False

    def attend(self, k, module, query, key, value, attention_mask, proceed, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError


class KVRetrievalAttachment(_Routed):
    """A retrieval kv-cache method (`core.method.RetrievalMethod`) attached to one causal LM.

    The method supplies ``check(info)`` (raises `CalibrationError` before any work),
    ``encode(k, keys_pre) -> codes [B, H_kv, q]``, ``decode_selection(k, query_w, codes, valid,
    scaling) -> selected [B, H_kv, K]`` and ``device_tensors()`` (codebooks etc., for the
    placement figures); ``relative_position`` is windowed RoPE's fixed query position.
    """

    def __init__(self, model: nn.Module, family: DecoderFamily, backbone: nn.Module, method):
        super().__init__(model, family, backbone)
        self.method = method
        method.check(self.info, self.full)
        self.stats = RetrievalStats()
        self.trace: list | None = None  # set to [] to record every decoding step's selection and inputs (tests, analysis)
        self._codes = method.codes  # the method's (weak, per cache layer): a cache encoded here decodes in a later apply
        self._wrope: dict = {}
        self.route()

    # ------------------------------------------------------------------ codes, aligned with the cache slots
    def _codes_for(self, k: int, layer, key: Tensor, new_pre: Tensor) -> Tensor:
        """Codes of every entry of ``layer`` (``key``: its keys after this forward's update), the new ones encoded now.

        Stored with a fingerprint of the last encoded slot (its key summed over D, per sample and
        head): a cache whose rows were reordered or replaced since (beam search's
        ``reorder_cache``, a cache filled outside) is refused rather than scored with wrong codes.
        """
        q, total = new_pre.shape[-2], key.shape[-2]
        new = self.method.encode(k, new_pre)
        if layer is None:  # no cache: this forward's keys only
            return new
        old = self._codes.get(layer)
        past = total - q
        if past == 0:
            codes = new
        else:
            have = 0 if old is None else old[0].shape[-1]
            ok = old is not None and old[0].shape[0] == new.shape[0] and have >= past
            if ok and have == past:  # not cropped: the slot we encoded last must still hold the same key
                ok = torch.equal(key[:, :, past - 1, :].float().sum(-1), old[1])
            if not ok:
                raise StageError(
                    f"layer {self.full[k]}'s cache holds {past} earlier entries that a2ats did not encode (it has codes "
                    f"for {have}): the cache was filled, reordered (beam search) or changed outside this attachment. "
                    "Run the prefill inside `with tokenreduce.apply(model, method):` with the cache you decode with "
                    "(generate() inside apply does this); beam search is not supported")
            codes = torch.cat((old[0][..., :past], new), dim=-1)  # a cache cropped from the end keeps its prefix
        self._codes[layer] = (codes, key[:, :, -1, :].float().sum(-1))
        return codes

    # ------------------------------------------------------------------ the attention function
    def attend(self, k, module, query, key, value, attention_mask, proceed, **kwargs):
        impl = lambda module, q, k_, v, mask, **kw: proceed(q, k_, v, mask, **kw)  # noqa: E731  the rest of the chain
        st = self._step.get(k)
        if st is None:
            raise StageError("the retrieval attention function ran without its pre-hook; call the attention module, "
                             "not the attention function directly")
        q, total = query.shape[-2], key.shape[-2]
        layer = None
        if isinstance(st.cache, Cache) and module.layer_idx < len(st.cache.layers):
            layer = st.cache.layers[module.layer_idx]
            if getattr(layer, "is_sliding", False) or type(layer).__name__ != "DynamicLayer":
                raise StageError(f"a2ats keeps codes aligned with a DynamicCache's full-attention layers; this cache "
                                 f"holds a {type(layer).__name__} at layer {module.layer_idx}: pass "
                                 "past_key_values=DynamicCache() or let the model create its cache")
        dt = torch.promote_types(key.dtype, torch.float32)
        new_pre = unrotate(key[..., total - q:, :].to(dt), st.cos.to(dt), st.sin.to(dt))
        codes = self._codes_for(k, layer, key, new_pre)
        decode = q == 1 and layer is not None and total > 1
        if k == 0:
            if not decode:
                self.stats = RetrievalStats(batch_size=query.shape[0])
            else:
                self.stats.kv_decode_steps += 1
        if not decode:
            return impl(module, query, key, value, attention_mask, **kwargs)

        valid = _validity(attention_mask, query.shape[0], total, key.device)
        w = self._wrope.get((dt, query.device))
        if w is None:
            w = self._wrope[(dt, query.device)] = self.wrope(self.method.relative_position, dt, query.device)
        query_w = rotate(unrotate(query.to(dt), st.cos.to(dt), st.sin.to(dt)), *w)  # pre-RoPE query at position w
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        selected, scores, picked = self.method.decode_selection(k, query_w, codes, valid, scaling)
        self._account(k, key, value, codes, selected, valid)
        if self.trace is not None:
            self.trace.append(dict(layer=self.full[k], step=self.stats.kv_decode_steps, scores=scores, picked=picked,
                                   selected=selected, valid=valid, codes=codes.clone(), query=query, key=key,
                                   scaling=scaling))
        if bool((selected == valid[:, None, :]).all()):
            return impl(module, query, key, value, attention_mask, **kwargs)  # nothing left out: the model's own call
        return attend_selected(impl, module, query, key, value, selected, self.impl == "eager", **kwargs)

    def _account(self, k, key, value, codes, selected, valid):
        s = self.stats
        b, hk, d = key.shape[0], key.shape[1], key.shape[-1]
        chosen = int(selected.sum())
        s.attended_sum += chosen
        s.context_sum += int(valid.sum()) * hk
        s.samples += b * hk
        if k == 0:
            s.placement = {"host": {"keys": 0, "values": 0}, "device": {"codes": 0},
                           "per_step_transfer": {"query_to_host": 0, "selection_to_host": 0, "output_to_device": 0,
                                                 "selected_kv_if_fetched_to_device": 0}, "note": PLACEMENT_NOTE}
            s.placement["device"].update({name: _nbytes(t) for name, t in self.method.device_tensors().items()})
        host, dev, xfer = s.placement["host"], s.placement["device"], s.placement["per_step_transfer"]
        host["keys"] += _nbytes(key)
        host["values"] += _nbytes(value)
        dev["codes"] += _nbytes(codes)
        xfer["query_to_host"] += b * self.info.num_heads * d * key.element_size()
        xfer["output_to_device"] += b * self.info.num_heads * d * key.element_size()
        xfer["selection_to_host"] += chosen * 4  # int32 indices of the selected entries
        xfer["selected_kv_if_fetched_to_device"] += chosen * (d + value.shape[-1]) * key.element_size()


PLACEMENT_NOTE = ("computed from tensor sizes, not measured: on this CPU-only machine host and device are the same memory. "
                  "Placement follows the paper's heterogeneous design (reference VQCacheOffload): full K/V on the host, "
                  "codes + codebooks on the device; the host attends over the selected entries.")


def _validity(mask, batch: int, total: int, device) -> Tensor:
    """Real entries [B, K] of a decoding step, from the layer's attention mask (None: all real)."""
    if mask is None:
        return torch.ones(batch, total, dtype=torch.bool, device=device)
    if mask.dim() != 4 or mask.shape[-1] < total:
        raise StageError(f"a2ats decodes with transformers' 4-D masks over the whole cache; got a mask of shape "
                         f"{tuple(mask.shape)} for {total} cached entries: pass a 2-D attention_mask over the sequence")
    row = mask[:, 0, -1, :total]
    row = row if row.dtype == torch.bool else row == 0
    return row.expand(batch, total)


# ---------------------------------------------------------------------------- calibration capture
class _Capture(_Routed):
    """Routes the full-attention modules to a callback receiving pre-RoPE keys and windowed-RoPE queries."""

    def __init__(self, model, family, backbone, position: int, callback):
        super().__init__(model, family, backbone)
        self.position, self.callback = position, callback
        self.route()

    def attend(self, k, module, query, key, value, attention_mask, proceed, **kwargs):
        st = self._step[k]
        q, total = query.shape[-2], key.shape[-2]
        dt = torch.promote_types(key.dtype, torch.float32)
        cos, sin = st.cos.to(dt), st.sin.to(dt)
        keys_pre = unrotate(key[..., total - q:, :].to(dt), cos, sin)
        query_w = rotate(unrotate(query.to(dt), cos, sin), *self.wrope(self.position, dt, query.device))
        self.callback(k, keys_pre, query_w)
        return proceed(query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture(model: nn.Module, position: int, callback):
    """While open, every forward of ``model`` calls ``callback(k, keys_pre, query_w)`` at each full-attention layer
    (``k``-th of them): the new pre-RoPE keys [B, H_kv, q, D] and the queries rotated to ``position`` [B, H, q, D].
    Yields the `DecoderInfo` and the full-attention layer indices; restores the model exactly on exit."""
    family, backbone = find_decoder(model)
    cap = _Capture(model, family, backbone, position, callback)
    try:
        yield cap.info, cap.full
    finally:
        cap.remove()
