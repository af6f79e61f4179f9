"""Virtual token unmerging (DyMU's VTU) in a VLM's language model.

A tower merge (DToMe, ToMe) hands the language model fewer visual rows; the connector
(`runtime.connector`) puts each at its earliest patch's place and says, for every prompt position,
which row its token ended up in (``rewritten["origin"]``). During a prefill that carries merged
rows, this stage runs every decoder layer as the reference does:

* norms, Q/K/V and output projections and the MLP run on the merged rows (that is the saving);
* a pre-hook on each layer gives its attention module identity rotary tables, so the module's own
  RoPE leaves Q and K unrotated; the attention call (a routed listener) then expands Q, K and V to
  one copy per prompt position, applies the model's own ``apply_rotary_pos_emb`` with the rotary
  tables of the original positions (computed once per forward by the language model's
  ``rotary_emb``), attends over the whole prompt with the model's own implementation (SDPA or eager;
  causal, the caller's padding masked), and returns each row's mean over its copies (scatter-mean);
* the cache keeps the expanded, rotated keys and values: the whole prompt, as the reference's.
  There is no memory saving, and decoding continues at the original positions with the caller's
  2-D mask (the connector leaves the cache alone for such a prefill).

A prefill in which no row stands for more than one position runs the model's own path (and the
connector's usual cache). Decoding steps pass through.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from ..core.errors import StageError, UnsupportedModelError
from ..core.kv import layer_mask
from ..core.method import UnmergeMethod
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, attention_modules, decoder_info, layer_types
from ..families.vlms import VLMParts
from .routing import call_arguments, check_implementation, route
from .vlm_inputs import VisualInputs


@dataclass
class UnmergeStats(Stats):
    """`Stats` plus what the language model saw (means over the batch's samples).

    ``visual_tokens``: the prompt's visual positions; ``kept_visual_tokens``: the merged rows standing for them
    (what the linear layers and MLPs process); attention runs over every position.
    """

    visual_tokens: float = 0.0
    kept_visual_tokens: float = 0.0
    prompt_tokens: float = 0.0
    kept_tokens: float = 0.0
    unmerged_forwards: int = 0  # prefills that ran the attention unmerged
    no_visual_forwards: int = 0
    kept_positions: list = field(default_factory=list)

    @property
    def kept_visual_fraction(self) -> float:
        return self.kept_visual_tokens / self.visual_tokens if self.visual_tokens else 1.0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "visual_tokens": self.visual_tokens, "kept_visual_tokens": self.kept_visual_tokens,
                "prompt_tokens": self.prompt_tokens, "kept_tokens": self.kept_tokens}


def unmerged_layer_flops(rows: float, length: float, info, mlp: int) -> float:
    """One decoder layer under VTU: Q/K/V/O projections and the gated MLP on ``rows`` merged rows, the two attention
    products over ``length`` prompt positions (`prefill_filter.decoder_layer_flops` with the two lengths apart)."""
    qd, kvd, h = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
    return 2 * rows * h * (qd + 2 * kvd) + 2 * rows * qd * h + 2 * 2 * length * length * qd + 3 * 2 * rows * h * mlp


def scatter_mean(x: Tensor, origin: Tensor, rows: int) -> Tensor:
    """``x`` [B, L, ...] -> [B, rows, ...]: each row the mean of the positions ``origin`` [B, L] sends to it (-1: none).
    A row no position goes to is zero."""
    b, n = origin.shape
    flat = x.reshape(b, n, -1)
    idx = torch.where(origin >= 0, origin, rows)
    out = flat.new_zeros(b, rows + 1, flat.shape[-1])
    out.scatter_add_(1, idx[..., None].expand_as(flat), flat)
    count = torch.zeros(b, rows + 1, dtype=flat.dtype, device=flat.device)
    count.scatter_add_(1, idx, torch.ones_like(idx, dtype=flat.dtype))
    out = out[:, :rows] / count[:, :rows, None].clamp_min(1)
    return out.reshape(b, rows, *x.shape[2:])


@dataclass
class _Run:
    origin: Tensor  # [B, L] merged row of each prompt position, -1 = padding
    rotary: tuple  # (cos, sin) [B, L, Dh] of the original positions
    mask: Tensor  # [B, 1, L, L] bool (sdpa) or additive (eager)
    rows: int  # M, the merged rows
    cache: Cache | None


class UnmergeAttachment:
    """VTU on one VLM's language model, after the connector stage that hands it merged rows."""

    def __init__(self, model: nn.Module, parts: VLMParts, family: DecoderFamily, backbone: nn.Module,
                 method: UnmergeMethod, after=None):
        name = method.name
        if backbone is not parts.language_model:
            raise UnsupportedModelError(f"{name}: the decoder found is not the VLM's language model")
        if parts.family.positions != "1d" or parts.family.mask != "2d":
            raise UnsupportedModelError(f"{name} unmerges with 1-D RoPE positions and a 2-D padding mask (LLaVA-style "
                                        f"models); this {parts.family.name} model has {parts.family.positions} positions "
                                        f"and a {parts.family.mask} mask")
        if any(t != "full_attention" for t in layer_types(backbone.config)):
            raise UnsupportedModelError(f"{name} unmerges in language models whose layers all use full attention")
        self.method, self.parts, self.backbone, self.after = method, parts, backbone, after
        self.impl = check_implementation(backbone.config, name)
        self.layers = list(family.layers(backbone))
        self.attns = attention_modules(family, backbone)
        self.info = decoder_info(family, backbone, ())
        self.mlp_size = backbone.config.intermediate_size
        self.stats = UnmergeStats()
        self._run: _Run | None = None
        self._sig = inspect.signature(backbone.forward)
        self._undo = Undo()
        rotary = getattr(backbone, "rotary_emb", None)
        self._rope = getattr(sys.modules[type(self.attns[0]).__module__], "apply_rotary_pos_emb", None)
        if rotary is None or self._rope is None:
            raise UnsupportedModelError(f"{name} needs the language model's rotary_emb and its modeling file's "
                                        f"apply_rotary_pos_emb; {type(backbone).__name__} lacks one")
        self._rotary = rotary
        try:
            self.inputs = VisualInputs(parts, self._undo)
            if after is not None:  # nothing to unmerge without a tower or connector stage before this one
                for i, (layer, attn) in enumerate(zip(self.layers, self.attns)):
                    route(attn, self, i, self._undo)
                    self._undo.append(layer.register_forward_pre_hook(self._layer_hook, with_kwargs=True).remove)
                self._undo += [backbone.register_forward_pre_hook(self._begin, with_kwargs=True).remove,
                               backbone.register_forward_hook(self._end, with_kwargs=True, prepend=True).remove]
                after.lm_counted_later = True
                self._undo.append(lambda: setattr(after, "lm_counted_later", False))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self._run = None
        self._undo.run()

    # ------------------------------------------------------------------ backbone hooks
    def _begin(self, backbone, args, kwargs):
        self._run = None
        ids = self.inputs.take_ids()
        rewritten, self.after.rewritten = self.after.rewritten, None
        if rewritten is None:  # text only, or a decoding step: the connector left the call alone
            if ids is not None and not self.inputs.images:
                self.inputs.fired = True
            return None
        self.inputs.fired = True
        kw = call_arguments(self._sig, args, kwargs)
        embeds = kw["inputs_embeds"]
        origin, valid, pos = rewritten["origin"], rewritten["valid"], rewritten["positions"]
        b, n = origin.shape
        rows = embeds.shape[1]
        if bool(((origin < 0) & valid).any()):
            raise StageError(f"{self.method.name} unmerges merged tokens; this prompt's rewrite dropped some "
                             "(a pruning tower or connector method): attach it with merging methods only (dymu, tome)")
        counts = torch.zeros(b, rows + 1, dtype=torch.long, device=origin.device)
        counts.scatter_add_(1, torch.where(origin >= 0, origin, rows), torch.ones_like(origin))
        self._record(rewritten, rows, n, merged=bool((counts[:, :rows] > 1).any()))
        if not self.stats.unmerged_forwards:  # nothing merged in this prefill: the model's own path
            return None
        cos, sin = self._rotary(embeds, position_ids=pos.expand(b, -1))
        own = layer_mask(valid, n) | (torch.eye(n, dtype=torch.bool, device=valid.device)[None, None]
                                      & ~valid[:, None, :, None])
        if self.impl == "eager":
            own = torch.zeros(own.shape, dtype=embeds.dtype, device=own.device).masked_fill(
                ~own, torch.finfo(embeds.dtype).min)
        cache = kw.get("past_key_values")
        self._run = _Run(origin=origin, rotary=(cos, sin), mask=own, rows=rows,
                         cache=cache if isinstance(cache, Cache) else None)
        self.after.keeps_whole_cache = True
        return None

    def _layer_hook(self, layer, args, kwargs):
        run = self._run
        if run is None:
            return None
        cos, _ = kwargs["position_embeddings"]
        new = dict(kwargs)
        new["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(cos))  # RoPE comes in `attend`
        return args, new

    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        run = self._run
        if run is None:
            return proceed(query, key, value, attention_mask, **kwargs)
        if query.shape[-2] != run.rows or key.shape[-2] != run.rows:
            raise StageError(f"{self.method.name}: layer {index} attends {query.shape[-2]} queries over "
                             f"{key.shape[-2]} keys; expected the {run.rows} merged rows of a fresh prefill")
        idx = run.origin.clamp_min(0)

        def expand(t: Tensor) -> Tensor:  # [B, H, M, D] -> [B, H, L, D]: one copy per prompt position
            return t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

        cos, sin = run.rotary
        q, k = self._rope(expand(query), expand(key), cos.to(query.dtype), sin.to(query.dtype))
        v = expand(value)
        if run.cache is not None and module.layer_idx < len(run.cache.layers):
            layer = run.cache.layers[module.layer_idx]
            if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[-2] != run.rows:
                raise StageError(f"{self.method.name}: layer {module.layer_idx}'s cache does not hold the prefill's "
                                 f"{run.rows} rows; VTU prefills into a fresh DynamicCache")
            layer.keys, layer.values = k, v  # the whole prompt, rotated at the original positions
        kw = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("position_ids", "cache_position")}
        out, _ = proceed(q, k, v, run.mask, **kw)  # [B, L, H, D]
        return scatter_mean(out, run.origin, run.rows), None

    def _end(self, backbone, args, kwargs, output):
        self._run = None
        return output

    # ------------------------------------------------------------------ stats
    def _record(self, rewritten: dict, rows: int, length: int, merged: bool) -> None:
        valid, kept = rewritten["valid"], rewritten["kept"]
        visual_rows = rewritten["visual"]
        slot = kept >= 0
        s = UnmergeStats(batch_size=kept.shape[0], no_visual_forwards=self.stats.no_visual_forwards,
                         unmerged_forwards=int(merged))
        origin = rewritten["origin"]
        vis = visual_rows.gather(1, origin.clamp_min(0)) & valid & (origin >= 0)
        s.visual_tokens = float(vis.sum(-1).float().mean())
        s.kept_visual_tokens = float(visual_rows.sum(-1).float().mean())
        s.prompt_tokens = float(valid.sum(-1).float().mean())
        s.kept_tokens = float(slot.sum(-1).float().mean())
        s.kept_positions = [[int(i) for i in row if i >= 0] for row in kept.tolist()]
        nl = self.info.num_layers
        s.tokens_per_layer = s.mlp_tokens_per_layer = [s.kept_tokens] * nl
        attended = length if merged else rows
        s.flops = nl * unmerged_layer_flops(rows, attended, self.info, self.mlp_size)
        self.stats = s

    def check_ran(self) -> None:
        if self.after is None:  # no tower or connector reduction attached: VTU has nothing to unmerge (a no-op)
            self.inputs.fired = True
        self.inputs.check(self.method.name)
