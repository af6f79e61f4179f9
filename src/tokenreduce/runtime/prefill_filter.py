"""Decoder stage, prefill filtering: pick prompt tokens in an early layer, prefill only those.

A `PrefillFilterMethod` (GemFilter) runs the prompt through the decoder up to a filter layer
``L``, scores every prompt token from layer ``L``'s post-RoPE query of the last token and
keys, keeps the top ones in their original order, and the model then prefills *only the kept
tokens* — a fresh, shorter prompt — and generates from there. Both savings are real: the
filter pass stops inside layer ``L``'s attention (layers after ``L``, and ``L``'s own attention
output and MLP, never run) and the second prefill runs on ``k`` tokens.

How it attaches (all undone exactly by `PrefillFilterAttachment.remove`):

* Layer ``L``'s attention module is routed to `attend` (`runtime.routing`). During a filter
  pass it scores the tokens and raises a private exception that ends the pass; otherwise it
  passes the call on unchanged. The filter pass is marked as a probe (`routing.probe_pass`)
  so a kv-cache stage attached with it ignores the pass.
* A forward pre-hook (with kwargs) on the backbone (``LlamaModel`` & co.) sees every call.
  A fresh prompt (no cache, or an empty one) is filtered: the hook calls the backbone itself
  for the filter pass (the model's own embedding, masks and rotary code, no cache), then
  rewrites the call's ``input_ids``/``inputs_embeds``, ``attention_mask`` and ``position_ids``
  to the kept tokens. A forward hook then turns the cache's layers into
  `core.kv.CompressedLayer` s whose *logical* length is the original prompt's (what the caller
  fed) and whose *physical* length is ``k``: ``generate``'s own bookkeeping (2-D mask growing
  from the original length, positions from it, slicing of inputs by ``get_seq_length``) then
  stays right without touching it.

Positions. The reference renumbers the kept tokens ``0..k-1`` and generates at ``k, k+1, ...``.
We give them ``P-k .. P-1`` instead, where ``P`` is the position the caller's next token gets
(``P = N`` for an unpadded prompt of ``N`` tokens; per sample under left padding), so the
caller's positions for generated tokens (``N, N+1, ...``) continue them. Every distance
between two tokens is the reference's, and RoPE attention depends only on distances, so the
outputs equal the reference's up to float rounding (a constant shift of all positions) — for
rotary embeddings with fixed frequencies (default, linear, llama3, yarn). Rotary types whose
frequencies depend on the largest position (``dynamic`` NTK; Phi-3's ``longrope`` switches to
its long factors past ``original_max_position_embeddings``) see ``N + t`` where the reference
sees ``k + t``, and may pick other frequencies — a documented difference.

Left-padded batches: each sample keeps its own top tokens among its real ones; with per-sample
budgets (``keep_ratio``) the kept prompts are left-padded to the longest, and those padded
slots must stay masked in every later step: a later forward's 2-D mask covers logical
positions, so the hook writes the slots' validity into the columns the cache's compressed
slots stand for (transformers slices the mask's last columns for a cache whose logical and
physical lengths differ). Outside the attachment such a cache refuses to be decoded
(`CompressedLayer.check_masked`); a batch whose samples keep the same count needs no help.

Later multi-token forwards on a filtered cache (a question sent after the filtered context)
are appended as they are, never filtered again. Consequence: ``generate(prefill_chunk_size=...)``
would filter only its first chunk — prefill GemFilter prompts in one piece. A multi-token
forward that continues a cache this method did not filter is refused.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.kv import CompressedLayer, kv_bytes, select_kept
from ..core.method import DecoderInfo, PrefillFilterMethod
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, attention_modules, decoder_info, layer_types
from .prompt_rewrite import continue_prompt, stand_for_prompt
from .routing import call_arguments, check_implementation, probe_pass, route


class _FilterDone(Exception):
    """Raised by layer L's attention in a filter pass once the scores are taken: ends the pass."""


@dataclass
class PrefillFilterStats(Stats):
    """`Stats` plus what the prefill filter did (means over the batch's samples).

    ``tokens_per_layer``: prompt tokens each decoder layer prefilled in the second pass (the
    kept ones); ``flops``: the filter pass (layers ``0..L-1`` on the whole prompt, layer ``L``'s
    projections, the scoring) plus the second prefill on the kept tokens; ``flops_full``: a
    plain prefill of the whole prompt. Attention counts ``2 * 2 * n^2 * H * D`` per layer (the
    full square, as the encoder stage). ``kv_*``: the cache after prefill vs. a plain prefill's.
    """

    prompt_tokens: float = 0.0
    kept_tokens: float = 0.0
    filter_layer: int = -1
    kept_positions: list[list[int]] = field(default_factory=list)  # per sample: kept columns of the caller's input

    def as_dict(self) -> dict:
        return {**super().as_dict(), "prompt_tokens": self.prompt_tokens, "kept_tokens": self.kept_tokens,
                "filter_layer": self.filter_layer}


def decoder_layer_flops(n: float, info: DecoderInfo, mlp: int) -> float:
    """One decoder layer on ``n`` tokens: Q/K/V/O projections, the two attention products, a gated MLP."""
    qd, kvd, h = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
    return 2 * n * h * (qd + 2 * kvd) + 2 * n * qd * h + 2 * 2 * n * n * qd + 3 * 2 * n * h * mlp


class PrefillFilterAttachment:
    """One prefill-filter method attached to one causal LM."""

    def __init__(self, model: nn.Module, family: DecoderFamily, backbone: nn.Module, method: PrefillFilterMethod):
        if not isinstance(method, PrefillFilterMethod):
            raise StageError(f"{method!r} is a decoder-stage method this attachment cannot run (it serves prefill "
                             "filters such as gemfilter)")
        self.family, self.backbone, self.method = family, backbone, method
        config = backbone.config
        self.layers = list(family.layers(backbone))
        self.attns = attention_modules(family, backbone)
        impl = check_implementation(config, method.name)
        types = layer_types(config)
        if any(t != "full_attention" for t in types):
            raise UnsupportedModelError(
                f"{method.name} supports decoders whose layers all use full attention; this {family.name} model has "
                f"{sorted(set(types))} layers (sliding_window={getattr(config, 'sliding_window', None)}): the "
                "shortened prompt's cache would not line up with sliding-window caches")
        self.info = decoder_info(family, backbone, tuple(range(len(self.layers))))
        self.mlp_size = config.intermediate_size
        layer = method.filter_layer(self.info, config)
        if not isinstance(layer, int) or not 0 <= layer < self.info.num_layers:
            raise StageError(f"{method!r}: filter layer {layer!r} is out of range for this {family.name} model with "
                             f"{self.info.num_layers} layers; use 0..{self.info.num_layers - 1}")
        self.filter_layer = layer
        self.impl = impl
        self.stats = PrefillFilterStats()
        self.kept: Tensor | None = None  # [B, k_max] kept prompt positions of the last filtered prompt, -1 = padded slot
        self._filtering = False
        self._valid: Tensor | None = None
        self._scores: Tensor | None = None
        self._pending: dict | None = None
        self._flagged: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        self._ran = False
        self._undo = Undo()
        self._sig = inspect.signature(backbone.forward)
        self._attach()

    # ------------------------------------------------------------------ attach / remove
    def _attach(self):
        try:
            route(self.attns[self.filter_layer], self, self.filter_layer, self._undo)
            h1 = self.backbone.register_forward_pre_hook(self._begin, with_kwargs=True)
            h2 = self.backbone.register_forward_hook(self._end, with_kwargs=True)
            self._undo += [h1.remove, h2.remove]
        except Exception:
            self.remove()
            raise

    def remove(self):
        self._unflag()
        self._pending = None
        self._undo.run()

    def _unflag(self):
        for layer in list(self._flagged):
            layer.masked_by = None
        self._flagged = weakref.WeakSet()

    # ------------------------------------------------------------------ the filter layer's attention
    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        if self._filtering:
            self._scores = self.method.score(query[:, :, -1], key, self._valid)
            raise _FilterDone
        return proceed(query, key, value, attention_mask, **kwargs)

    # ------------------------------------------------------------------ backbone hooks
    def _begin(self, backbone, args, kwargs):
        if self._filtering:
            return None
        self._ran = True
        self._unflag()
        self._pending = None
        kw = call_arguments(self._sig, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None  # the model raises its own error
        cache = kw.get("past_key_values")
        if isinstance(cache, Cache) and any(isinstance(l, CompressedLayer) for l in cache.layers):
            return (), self._continue(kw, cache, x.shape[0], x.shape[1])
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            if x.shape[1] == 1:
                return None  # a decoding step of a cache this method never filtered: nothing to do
            raise StageError(f"{self.method.name} filters a whole prompt at once, but this forward continues a cache "
                             f"that already holds {cache.get_seq_length()} unfiltered tokens; pass the whole prompt "
                             "with an empty cache (past_key_values=DynamicCache() or none)")
        return (), self._filter(kw, cache, x)

    def _filter(self, kw: dict, cache, x: Tensor) -> dict:
        """Filter pass on the whole prompt; returns the call's kwargs rewritten to the kept tokens."""
        b, n = x.shape[:2]
        dev = x.device
        mask = kw.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() != 2:
            raise StageError(f"{self.method.name} needs the 2-D padding mask of the prompt (or none); got a "
                             f"{mask.dim()}-D attention_mask")
        valid = mask.to(device=dev, dtype=torch.bool) if isinstance(mask, Tensor) else torch.ones(b, n, dtype=torch.bool, device=dev)
        if valid.shape != (b, n):
            raise StageError(f"the attention_mask {tuple(valid.shape)} does not cover the prompt {(b, n)}")
        pos = kw.get("position_ids")
        if isinstance(pos, Tensor) and pos.dim() != 2:
            raise StageError(f"{self.method.name} supports 1-D rotary positions (position_ids [B, N]); got "
                             f"{pos.dim()}-D position_ids")
        use_cache = kw.get("use_cache")
        use_cache = self.backbone.config.use_cache if use_cache is None else use_cache
        if cache is not None:
            if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
                raise StageError(f"{self.method.name} prefills into a DynamicCache (transformers' default, not "
                                 f"offloaded); got {type(cache).__name__}. Pass past_key_values=DynamicCache() or none")
            if any(type(l) is not DynamicLayer for l in cache.layers):
                raise StageError(f"{self.method.name} needs a cache of plain DynamicLayers (all full attention)")
        lengths = valid.sum(-1)
        budgets = self.method.budgets(lengths).to(dev)  # BudgetError before any work
        if bool((budgets == lengths).all()):
            kept = torch.where(valid, torch.arange(n, device=dev)[None, :], -1)  # everything: no filter pass
        else:
            scores = self._filter_pass(kw, valid)
            kept = select_kept(scores[:, None, :], valid, budgets)[:, 0]  # [B, max budget], ascending, -1 first
        k = kept.shape[1]
        slot = kept >= 0  # [B, k] real slots (left padding for samples that keep fewer)
        idx = kept.clamp_min(0)
        # positions: the kept tokens end right before the caller's next position P (see module doc)
        nxt = (pos.expand(b, -1)[:, -1] + 1).to(dev) if isinstance(pos, Tensor) else torch.full((b,), n, device=dev)
        new_pos = torch.where(slot, nxt[:, None] - k + torch.arange(k, device=dev)[None, :], 0)
        out = dict(kw)
        if kw.get("input_ids") is not None:
            out["input_ids"] = kw["input_ids"].gather(1, idx)
        else:
            e = kw["inputs_embeds"]
            out["inputs_embeds"] = e.gather(1, idx[..., None].expand(-1, -1, e.shape[-1]))
        out["attention_mask"] = slot.to(mask.dtype) if isinstance(mask, Tensor) else (None if bool(slot.all()) else slot.long())
        out["position_ids"] = new_pos.to(pos.dtype if isinstance(pos, Tensor) else torch.long)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.backbone.config)
        out["past_key_values"] = cache
        self.kept = kept
        self._pending = dict(cache=cache if use_cache else None, length=n, kept=kept, slot=slot, lengths=lengths,
                             budgets=budgets, batch=b)
        return out

    def _filter_pass(self, kw: dict, valid: Tensor) -> Tensor:
        """Run the backbone on the whole prompt up to layer L's attention (no cache); the scores [B, N]."""
        run = dict(kw)
        run["past_key_values"], run["use_cache"] = None, False
        self._filtering, self._valid, self._scores = True, valid, None
        try:
            with probe_pass(self.backbone):
                self.backbone(**run)
        except _FilterDone:
            pass
        finally:
            self._filtering, self._valid = False, None
        scores, self._scores = self._scores, None
        if scores is None:
            raise NeverFiredError(f"{self.method.name}: the filter pass ran the {self.info.family} decoder but its layer "
                                  f"{self.filter_layer} attention never did; is the model truncated "
                                  "(config.num_hidden_layers)?")
        return scores

    def _continue(self, kw: dict, cache: Cache, batch: int, q: int) -> dict:
        """A later forward on a filtered cache: let the compressed layers be masked by transformers' one mask."""
        return continue_prompt(kw, cache, batch, q, self, self._flagged, self.method.name)

    def _end(self, backbone, args, kwargs, output):
        if self._filtering:
            return output
        self._unflag()
        p, self._pending = self._pending, None
        if p is None:
            return output
        s = PrefillFilterStats(batch_size=p["batch"], filter_layer=self.filter_layer)
        n_mean, k_mean = float(p["lengths"].float().mean()), float(p["budgets"].float().mean())
        s.prompt_tokens, s.kept_tokens = n_mean, k_mean
        s.kept_positions = [[int(i) for i in row if i >= 0] for row in p["kept"].tolist()]
        info, nl = self.info, self.info.num_layers
        s.tokens_per_layer = [k_mean] * nl
        s.mlp_tokens_per_layer = [k_mean] * nl
        filtered = not bool((p["budgets"] == p["lengths"]).all())
        n_w, k_w = p["length"], p["kept"].shape[1]  # computed widths (padding included), as the FLOPs convention
        s.scoring_flops = self.method.scoring_flops(n_w, info) if filtered else 0.0
        qkv = 2 * n_w * info.hidden_size * (info.num_heads + 2 * info.num_kv_heads) * info.head_dim
        filter_flops = (self.filter_layer * decoder_layer_flops(n_w, info, self.mlp_size) + qkv) if filtered else 0.0
        s.flops = filter_flops + s.scoring_flops + nl * decoder_layer_flops(k_w, info, self.mlp_size)
        s.flops_full = nl * decoder_layer_flops(n_w, info, self.mlp_size)
        cache = p["cache"]
        if cache is not None:
            for i, layer, new in stand_for_prompt(cache, p["kept"], p["length"], info.num_kv_heads, self):
                before = layer.keys[..., :1, :].numel() * n_w * layer.keys.element_size() * 2
                s.kv_layers.append(i)
                s.kv_entries_per_layer.append(n_mean)
                s.kv_kept_per_layer.append(k_mean)
                s.kv_slots_per_layer.append(k_w)
                s.kv_bytes_before_per_layer.append(before)
                s.kv_bytes_after_per_layer.append(kv_bytes(new))
        self.stats = s
        return output

    def check_ran(self):
        """Called after the model's forward: its decoder must have run through our hooks."""
        if not self._ran:
            raise NeverFiredError(f"the model ran but its {self.info.family} decoder did not, so {self.method.name} never "
                                  "fired; call the causal LM (or its decoder) the method is attached to")
        self._ran = False
