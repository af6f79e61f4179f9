"""Connector stage: keep or merge visual tokens where they enter a VLM's language model.

Every supported VLM (`families.vlms`) embeds the prompt, scatters the projected image features
into the embeddings at the placeholder tokens and calls its language model. This stage hooks
that call (a forward pre-hook with kwargs on the language model) and, for a prompt that carries
visual tokens, rewrites it before the first layer runs:

* the visual tokens come from the input ids (captured by a pre-hook on the VLM's inner model)
  and the model's placeholder ids; each contiguous run of them in a sample is one image;
* the method plans one `Reduction` per image (`ConnectorMethod.plan`); text tokens stay;
* embeddings, every position row (M-RoPE's three), the 2-D mask or a dict of 4-D masks
  (Gemma 3), and Qwen3-VL's deepstack features follow the same map; samples that end with
  different lengths are left-padded and masked;
* kept tokens keep their original positions (a merged token its earliest source's), or are
  renumbered end-aligned when the method asks (``renumber=True``), so ``generate`` continues
  at the caller's next position either way;
* after the prefill each cache layer stands for the whole prompt (`prompt_rewrite`): logical
  length the caller's, physical length the kept tokens.

Methods that read the tower's [CLS] attention (FasterVLM, VisionZip) get it from a listener on
the attention call of the tower's select layer (the block whose output the projector reads):
only the [CLS] row is computed from Q and K, the tower's own attention stays SDPA.

A method that scores its output tokens (``gives_prior``: VFlowOpt's tower map, a recycled token its strongest
member's score) hands the scores, one per rewritten row, to an in-LLM stage after it that asks for them
(``wants_prior``, ``rewritten["prior"]``).

A prompt without visual tokens (text only) passes unchanged and is counted in the stats
(``no_visual_forwards``). Visual tokens in a forward that continues a cache are refused.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache

from ..core.errors import NeverFiredError, StageError, UnsupportedModelError
from ..core.kv import CompressedLayer, gather_mask, kv_bytes
from ..core.method import ConnectorMethod, VisualContext, generator_for
from ..core.reduction import Reduction
from ..core.stats import Stats
from ..core.undo import Undo
from ..families.decoders import DecoderFamily, decoder_info
from ..families.encoders import find_encoders
from ..families.vlms import VLMParts
from ..scoring.attention import cls_attention, full_attention
from .prefill_filter import decoder_layer_flops
from .prompt_rewrite import continue_prompt, stand_for_prompt
from .routing import call_arguments, route
from .vlm_inputs import VisualInputs

CLS_METHODS_NOTE = "methods that need no [CLS]: visual_random, visual_pool"


@dataclass
class ConnectorStats(Stats):
    """`Stats` plus what the connector did (means over the batch's samples).

    ``flops`` / ``flops_full``: the language model's prefill on the rewritten / original prompt
    (padding included, as every stage counts), plus the method's planning work.
    """

    visual_tokens: float = 0.0
    kept_visual_tokens: float = 0.0
    prompt_tokens: float = 0.0
    kept_tokens: float = 0.0
    no_visual_forwards: int = 0  # forwards whose prompt had no visual token (text only): passed unchanged
    kept_positions: list[list[int]] = field(default_factory=list)  # per sample: prompt positions of the kept tokens

    def as_dict(self) -> dict:
        return {**super().as_dict(), "visual_tokens": self.visual_tokens, "kept_visual_tokens": self.kept_visual_tokens,
                "prompt_tokens": self.prompt_tokens, "kept_tokens": self.kept_tokens,
                "no_visual_forwards": self.no_visual_forwards}


def visual_runs(visual: Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, the (start, end) of each contiguous run of visual tokens."""
    out = []
    for row in visual.tolist():
        runs, start = [], None
        for i, v in enumerate(row + [False]):
            if v and start is None:
                start = i
            elif not v and start is not None:
                runs.append((start, i))
                start = None
        out.append(runs)
    return out


def square_grid(n: int) -> tuple[int, int] | None:
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else None


def select_block(config, num_blocks: int) -> int:
    """The tower block whose output the projector reads (LLaVA's ``vision_feature_layer``)."""
    layer = getattr(config, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise UnsupportedModelError(f"a vision_feature_layer list ({layer}) concatenates several tower layers; the "
                                    f"[CLS] attention of one select layer is undefined ({CLS_METHODS_NOTE})")
    block = num_blocks + layer if layer < 0 else layer - 1
    if not 0 <= block < num_blocks:
        raise UnsupportedModelError(f"vision_feature_layer={layer} selects the embeddings, not a block's output")
    return block


def _patch_groups(source: Reduction | None, image: int, first: int, n: int, anchors: Tensor) -> Tensor | None:
    """For each of an image's ``n`` patches, the patch whose slot holds the feature it was merged into (the feature's
    earliest patch; -1: dropped), from the tower's source map; None for a dense map."""
    if source is None or source.dest is None:
        return None
    d = source.dest[image, first:first + n] - first  # the output feature each patch went to
    ok = (d >= 0) & (d < anchors.numel())
    return torch.where(ok, anchors.gather(0, d.clamp(0, max(anchors.numel() - 1, 0))), -1).cpu()


def _origin(dest: Tensor, unmerged: list) -> Tensor:
    """[B, L]: the rewritten row each prompt position's token ended up in (-1: padding or dropped). Text and kept
    tokens: their own row; a patch a tower merge took away: the row of the feature it was merged into."""
    origin = dest.clone()
    for s_i, start, groups in unmerged:
        if groups is None:
            continue
        n = groups.numel()
        at = torch.where(groups >= 0, dest[s_i, start + groups.clamp_min(0)], -1)
        origin[s_i, start:start + n] = at
    return origin


class _KeepAll(ConnectorMethod):
    """The connector's own pass when only the tower reduced: keep every visual token that reached the prompt."""

    name = "tower reduction"
    paper = "-"

    def __init__(self):
        super().__init__(keep_ratio=1.0)

    def plan(self, ctx: VisualContext) -> Reduction:
        return Reduction.identity(1, ctx.features.shape[0], device=ctx.features.device)


class ConnectorAttachment:
    """One connector method attached to one VLM."""

    def __init__(self, model: nn.Module, parts: VLMParts, family: DecoderFamily, backbone: nn.Module,
                 method: ConnectorMethod | None, tower: "EncoderAttachment | None" = None):  # noqa: F821
        """``method`` None: only drop what an encoder method in the tower (``tower``) took away."""
        self.method = method if method is not None else _KeepAll()
        if backbone is not parts.language_model:
            raise UnsupportedModelError(f"{self.method.name}: the decoder found ({type(backbone).__name__}) is not the "
                                        f"VLM's language model ({type(parts.language_model).__name__})")
        self.parts, self.backbone, self.encoder = parts, backbone, tower
        method = self.method
        self.info = decoder_info(family, backbone, ())
        self.mlp_size = backbone.config.intermediate_size
        self.stats = ConnectorStats()
        self.strategy = getattr(parts.inner.config, "vision_feature_select_strategy", "default")
        self._undo = Undo()
        self._flagged: weakref.WeakSet[CompressedLayer] = weakref.WeakSet()
        self._sig = inspect.signature(backbone.forward)
        self._tower: dict | None = None
        self._tower_maps: Tensor | None = None
        self._pending: dict | None = None
        self._tower_slots: list[Tensor] | None = None
        self.rewritten: dict | None = None  # the last rewrite's rows, for an in-LLM stage after this one
        self.lm_counted_later = False  # an in-LLM stage follows: it counts the language model's FLOPs and layers
        self.keeps_whole_cache = False  # set per prefill by a stage that fills the cache at the prompt's full length
        self.wants_prior = False  # an in-LLM stage follows that ranks by the method's scores (``needs_prior``)
        self._tower_groups: list[Tensor | None] | None = None
        self._prior: Tensor | None = None  # the last plan's score of each row [B, M] (NaN: text), if it gives one
        try:
            if method.needs_cls or tower is not None:
                self._route_tower(parts)
            if tower is not None:
                self._wrap_image_features(parts)
            self.inputs = VisualInputs(parts, self._undo, self._check_budgets)
            self._undo += [backbone.register_forward_pre_hook(self._begin, with_kwargs=True).remove,
                           backbone.register_forward_hook(self._end, with_kwargs=True).remove]
        except Exception:
            self.remove()
            raise

    def _route_tower(self, parts: VLMParts) -> None:
        """Route the tower's select block (the [CLS] row) and, under a tower reduction, every block from it on (they
        run unhooked on the reduced tokens and need the padding / proportional-attention bias)."""
        if self.encoder is not None and not self.method.needs_cls:
            fam, _owner, blocks, config = find_encoders(parts.tower)[0]
            self._tower_block = select_block(parts.inner.config, len(blocks))
            for i in range(self._tower_block, len(blocks)):
                route(fam.attention(blocks[i]), self, i, self._undo)
            return
        if not parts.family.cls_tower:
            raise UnsupportedModelError(f"{self.method.name} reads the tower's [CLS] attention, but the {parts.family.name} "
                                        f"tower has no [CLS] token; {CLS_METHODS_NOTE}")
        found = find_encoders(parts.tower)
        fam, _owner, blocks, config = found[0]
        if fam.num_prefix(config) < 1:
            raise UnsupportedModelError(f"{self.method.name} reads the tower's [CLS] attention, but this {fam.name} tower "
                                        f"has no [CLS] token; {CLS_METHODS_NOTE}")
        self._tower_block = select_block(parts.inner.config, len(blocks))
        for i in range(self._tower_block, len(blocks) if self.encoder is not None else self._tower_block + 1):
            route(fam.attention(blocks[i]), self, i, self._undo)

    def _wrap_image_features(self, parts: VLMParts) -> None:
        """Under a tower reduction the projector returns fewer features than the prompt has image tokens: put each
        one at its earliest source patch's slot (zeros elsewhere, dropped by the rewrite), as the prompt expects."""
        inner = parts.inner
        original = inner.get_image_features
        first = 0 if self.strategy == "full" else 1

        @functools.wraps(original)  # generate reads its signature to pre-compute the features
        def get_image_features(*args, **kwargs):
            out = original(*args, **kwargs)
            tokens = self.encoder.tokens
            anchors = tokens.source.anchors()  # [I, M] input token each output token starts at
            n = tokens.source.num_in - first
            feats, slots, groups = [], [], []
            for i, f in enumerate(out.pooler_output):
                a = anchors[i, first:first + f.shape[0]] - first
                if tokens.valid is not None:
                    a = torch.where(tokens.valid[i, first:first + f.shape[0]], a, -1)
                full = f.new_zeros(n, f.shape[-1])
                full[a[a >= 0]] = f[a >= 0]
                feats.append(full)
                slots.append(a)
                groups.append(_patch_groups(tokens.source, i, first, n, a))
            out.pooler_output = feats
            self._tower_slots = slots
            self._tower_groups = groups
            return out

        self._undo.set_instance_attr(inner, "get_image_features", get_image_features)

    def remove(self) -> None:
        for layer in list(self._flagged):
            layer.masked_by = None
        self._flagged = weakref.WeakSet()
        self._pending = None
        self._undo.run()

    # ------------------------------------------------------------------ the tower's select layer
    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        if self.encoder is not None and self.encoder.tokens is not None:  # blocks after the tower's reductions
            state = self.encoder.tokens
            bias = state.key_bias(self.encoder.prop_attn and not state.uniform_sizes(), query.dtype)
            if bias is not None:
                attention_mask = bias if attention_mask is None else attention_mask + bias
        if index == self._tower_block and self.method.needs_cls:
            scale = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            self._tower = {"cls": cls_attention(query, key, attention_mask, scale), "keys": key}
            if self.method.needs_attention_map:
                self._tower["map"] = full_attention(query.float(), key.float(), attention_mask, scale)
        return proceed(query, key, value, attention_mask, **kwargs)

    # ------------------------------------------------------------------ hooks
    def _check_budgets(self, ids: Tensor) -> None:
        """Budget errors before the tower runs (a tower reduction may leave fewer tokens: checked again)."""
        for r in visual_runs(self.parts.visual_mask(ids)):
            for s, e in r:
                self.method.budgets(torch.tensor([e - s]))

    def _begin(self, backbone, args, kwargs):
        kw = call_arguments(self._sig, args, kwargs)
        ids = self.inputs.take_ids()
        if ids is None and self.inputs.images:
            raise StageError(f"{self.method.name} finds visual tokens from input_ids; this call passed "
                             "inputs_embeds instead. Pass input_ids (and pixel_values)")
        embeds = kw.get("inputs_embeds")
        cache = kw.get("past_key_values")
        if isinstance(cache, Cache) and any(getattr(l, "rewritten_by", None) is self for l in cache.layers):
            q = embeds.shape[1] if embeds is not None else kw["input_ids"].shape[1]
            b = embeds.shape[0] if embeds is not None else kw["input_ids"].shape[0]
            if ids is not None and self.inputs.images and bool(self.parts.visual_mask(ids).any()):
                raise StageError(f"{self.method.name}: visual tokens in a forward that continues a cache; send the "
                                 "image in the first forward of the prompt")
            return (), continue_prompt(kw, cache, b, q, self, self._flagged, self.method.name)
        if ids is None or embeds is None:
            return None
        visual = self.parts.visual_mask(ids)
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if not bool(visual.any()):
            if not past:  # a text-only prompt: nothing to reduce (counted); decoding steps leave the stats alone
                self.stats = ConnectorStats(batch_size=ids.shape[0],
                                            no_visual_forwards=self.stats.no_visual_forwards + 1)
            return None
        if past:
            if not self.inputs.images:  # a generated token that happens to be a placeholder id: text
                return None
            raise StageError(f"{self.method.name}: visual tokens in a forward that continues a cache holding "
                             f"{past} tokens; prefill the image prompt in one forward")
        self.inputs.fired = True
        return (), self._rewrite(kw, ids, visual, embeds, cache)

    # ------------------------------------------------------------------ the rewrite
    def _plan(self, ids: Tensor, visual: Tensor, embeds: Tensor) -> tuple[Reduction, list[float]]:
        """The whole prompt's map [B, L] -> [B, M]: text tokens kept, each image reduced by the method."""
        b, length = ids.shape
        runs = visual_runs(visual)
        tower = self._tower_rows(runs)
        slots_by_image, self._tower_slots = self._tower_slots, None
        groups_by_image, self._tower_groups = self._tower_groups, None
        unmerged = []  # (sample, run start, each patch's group anchor): where a tower merge put every patch
        seed = getattr(self.method, "seed", None)
        dest = torch.full((b, length), -1, dtype=torch.long)
        coef = torch.zeros(b, length, dtype=torch.float32)
        counts, planning = [], 0.0
        image = 0
        gives = self.method.gives_prior and self.wants_prior
        nan = float("nan")
        priors: list[list[float]] = []  # per sample, the method's score of each slot (NaN: text), when it gives one
        for s_i, sample_runs in enumerate(runs):
            slots: list[tuple[int, list[tuple[int, float]], float]] = []  # (anchor, [(source, weight)], prior)
            in_run = torch.zeros(length, dtype=torch.bool)
            for s, e in sample_runs:
                in_run[s:e] = True
                order = torch.arange(e - s)  # the image's tokens that reached the prompt, by position
                if slots_by_image is not None:  # a tower reduction left fewer, at their earliest patch's slot
                    a = slots_by_image[image].cpu()
                    real = (a >= 0).nonzero().flatten()
                    order = real[a[real].argsort()]
                    positions = a[order]
                else:
                    positions = order
                n = order.numel()
                grid = None if slots_by_image is not None else square_grid(n) if self.strategy != "full" \
                    else square_grid(n - 1)
                budget = int(self.method.budgets(torch.tensor([n]))[0])
                ctx = VisualContext(features=embeds[s_i, s + positions.to(embeds.device)], budget=budget, grid=grid,
                                    generator=generator_for(seed, "cpu"))  # per image: a batch = its samples alone
                if tower is not None:
                    cls, keys = tower[image]
                    ctx.cls_attention, ctx.tower_keys = cls[:, order.to(cls.device)], keys[:, order.to(keys.device)]
                    if self._tower_maps is not None:  # the prefix tokens, then this image's tokens in feature order
                        m = self._tower_maps[image]
                        idx = torch.cat([torch.arange(m.shape[-1] - cls.shape[-1]), m.shape[-1] - cls.shape[-1]
                                         + order]).to(m.device)
                        ctx.tower_attention = m[:, idx][:, :, idx]
                if groups_by_image is not None:
                    unmerged.append((s_i, s, groups_by_image[image]))
                image += 1
                red = self.method.plan(ctx)
                planning += self.method.scoring_flops(n, ctx)
                if red.batch != 1 or red.num_in != n or red.num_out > ctx.budget:
                    raise StageError(f"{self.method!r} planned a map of {red.num_in} -> {red.num_out} tokens for an "
                                     f"image of {n} tokens with a budget of {ctx.budget}")
                prior = self._prior_of(ctx, red) if gives else None
                d, c, a = red.dest[0].cpu(), red.coef[0].float().cpu(), red.anchors()[0].cpu()
                for m in range(red.num_out):
                    if a[m] < 0:
                        continue
                    members = (d == m).nonzero().flatten().tolist()
                    slots.append((s + int(positions[a[m]]), [(s + int(positions[j]), float(c[j])) for j in members],
                                  nan if prior is None else float(prior[m])))
            real = self._valid[s_i]
            for t in range(length):
                if not in_run[t] and bool(real[t]):
                    slots.append((t, [(t, 1.0)], nan))
            slots.sort(key=lambda x: x[0])
            counts.append(len(slots))
            priors.append([p for _, _, p in slots])
            for slot, (_, members, _) in enumerate(slots):
                for j, w in members:
                    dest[s_i, j] = slot
                    coef[s_i, j] = w
        width = max(counts)
        for s_i, count in enumerate(counts):  # left padding
            dest[s_i] = torch.where(dest[s_i] >= 0, dest[s_i] + width - count, -1)
        self._prior = None
        if gives:  # [B, M] aligned with the rewritten rows: NaN at text rows and padded slots
            self._prior = torch.full((b, width), nan, dtype=torch.float32)
            for s_i, row in enumerate(priors):
                if row:
                    self._prior[s_i, width - len(row):] = torch.tensor(row, dtype=torch.float32)
        self._origin = _origin(dest, unmerged)
        dev = embeds.device
        return Reduction(num_out=width, dest=dest.to(dev), coef=coef.to(dev)), [planning / max(b, 1)]

    def _prior_of(self, ctx: VisualContext, red: Reduction) -> Tensor:
        """The method's score of each output token of ``red`` [num_out] (`ConnectorMethod.prior`), checked."""
        prior = self.method.prior(ctx, red)
        if not isinstance(prior, Tensor) or prior.shape != (red.num_out,):
            raise StageError(f"{self.method.name}: prior() must return one score per output token "
                             f"[{red.num_out}]; got {getattr(prior, 'shape', prior)!r}")
        return prior.detach().float().cpu()

    def _tower_rows(self, runs) -> list[tuple[Tensor, Tensor]] | None:
        """Per image, the [CLS] attention [H, n] and keys [H, n, D] of its visual tokens (in feature order)."""
        if not self.method.needs_cls:
            return None
        if self._tower is None:
            raise NeverFiredError(f"{self.method.name}: the prompt has visual tokens but the tower's select layer did not "
                                  "run in this forward; pass pixel_values with the image tokens")
        cls, keys = self._tower["cls"], self._tower["keys"]  # [I, H, N+1], [I, H_kv, N+1, D]
        self._tower_maps = self._tower.get("map")  # [I, H, N+1, N+1] when the method reads the whole map
        self._tower = None  # used once
        first = 0 if self.strategy == "full" else 1
        sizes = [e - s for r in runs for s, e in r]
        if len(sizes) != cls.shape[0] or (self.encoder is None and any(n != cls.shape[-1] - first for n in sizes)):
            raise StageError(f"{self.method.name} maps each run of image tokens to one tower image of "
                             f"{cls.shape[-1] - first} tokens; this prompt has runs of {sizes} tokens for "
                             f"{cls.shape[0]} images (tiled or multi-crop images are not supported for [CLS] scoring; "
                             f"{CLS_METHODS_NOTE})")
        return [(cls[i, :, first:], keys[i, :, first:]) for i in range(cls.shape[0])]

    def _rewrite(self, kw: dict, ids: Tensor, visual: Tensor, embeds: Tensor, cache) -> dict:
        b, length = ids.shape
        dev = embeds.device
        mask = kw.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            self._valid = mask.to(torch.bool).cpu()
        else:
            self._valid = torch.ones(b, length, dtype=torch.bool)
        red, (planning,) = self._plan(ids, visual, embeds)
        anchors = red.anchors()  # [B, M] prompt position of each slot, -1 = padding
        slot = anchors >= 0
        idx = anchors.clamp_min(0)
        out = dict(kw)
        out["inputs_embeds"] = red.apply(embeds)
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=dev)[None].expand(b, -1)
        if self.method.renumber:
            if pos.dim() != 2:
                raise StageError(f"{self.method.name}(renumber=True) renumbers 1-D positions; this model's positions are "
                                 f"{pos.dim()}-D (M-RoPE): use renumber=False")
            count = slot.sum(-1, keepdim=True)
            nxt = pos.expand(b, -1)[:, -1:] + 1
            rank = slot.long().cumsum(-1) - 1
            new_pos = torch.where(slot, nxt - count + rank, 1)
        elif pos.dim() == 3:  # M-RoPE [k, B, L]
            new_pos = torch.where(slot[None], pos.expand(-1, b, -1).gather(2, idx[None].expand(pos.shape[0], -1, -1)), 1)
        else:
            new_pos = torch.where(slot, pos.expand(b, -1).gather(1, idx), 1)
        out["position_ids"] = new_pos
        out["attention_mask"] = self._masks(mask, slot, idx, red)
        if self.parts.family.deepstack and kw.get("visual_pos_masks") is not None:
            out.update(self._deepstack(kw, red, visual, slot, idx))
        use_cache = kw.get("use_cache")
        use_cache = self.backbone.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.backbone.config)
        out["past_key_values"] = cache
        kept = torch.where(slot, anchors, -1)
        self._pending = {"cache": cache if use_cache else None, "kept": kept, "length": length}
        self.rewritten = {"visual": visual.gather(1, idx) & slot, "kept": kept,
                          # for a stage that unmerges (VTU): each prompt position's row (-1: padding or dropped), the
                          # caller's positions and padding
                          "origin": self._origin.to(dev), "positions": pos, "valid": self._valid.to(dev),
                          # the method's score of each row (`ConnectorMethod.prior`; NaN at text), when it gives one
                          "prior": None if self._prior is None else self._prior.to(dev)}
        self._record(ids, visual, slot, red, planning, kept)
        return out

    def _masks(self, mask, slot: Tensor, idx: Tensor, red: Reduction):
        if mask is None or (isinstance(mask, Tensor) and mask.dim() == 2):
            return slot.long() if mask is None else slot.to(mask.dtype)
        if isinstance(mask, dict):  # Gemma 3: full / sliding 4-D masks built by the outer model
            return {k: None if v is None else gather_mask(v, idx, slot) for k, v in mask.items()}
        if isinstance(mask, Tensor) and mask.dim() == 4:
            return gather_mask(mask, idx, slot)
        raise StageError(f"{self.method.name}: unsupported attention_mask of type {type(mask).__name__}")

    def _deepstack(self, kw: dict, red: Reduction, visual: Tensor, slot: Tensor, idx: Tensor) -> dict:
        """Qwen3-VL: the visual features added after early layers follow the visual tokens."""
        vis_mask = kw["visual_pos_masks"]
        new_mask = vis_mask.gather(1, idx) & slot
        feats = []
        for f in kw.get("deepstack_visual_embeds") or []:
            full = f.new_zeros(*vis_mask.shape, f.shape[-1])
            full[vis_mask] = f
            feats.append(red.apply(full)[new_mask])
        return {"visual_pos_masks": new_mask, "deepstack_visual_embeds": feats}

    def _record(self, ids, visual, slot, red: Reduction, planning: float, kept: Tensor) -> None:
        b, length = ids.shape
        real = self._valid
        vis = (visual.cpu() & real).sum(-1).float()
        new_vis = red.valid(visual & real.to(visual.device)).sum(-1).float().cpu()
        s = ConnectorStats(batch_size=b, no_visual_forwards=self.stats.no_visual_forwards)
        s.visual_tokens, s.kept_visual_tokens = float(vis.mean()), float(new_vis.mean())
        s.prompt_tokens, s.kept_tokens = float(real.sum(-1).float().mean()), float(slot.sum(-1).float().mean())
        nl, m = self.info.num_layers, red.num_out
        s.tokens_per_layer = s.mlp_tokens_per_layer = [] if self.lm_counted_later else [s.kept_tokens] * nl
        s.scoring_flops = planning
        s.flops = (0.0 if self.lm_counted_later else nl * decoder_layer_flops(m, self.info, self.mlp_size)) + planning
        s.flops_full = nl * decoder_layer_flops(length, self.info, self.mlp_size)
        s.kept_positions = [[int(i) for i in row if i >= 0] for row in kept.tolist()]
        self.stats = s

    def _end(self, backbone, args, kwargs, output):
        for layer in list(self._flagged):
            layer.masked_by = None
        self._flagged = weakref.WeakSet()
        p, self._pending = self._pending, None
        whole, self.keeps_whole_cache = self.keeps_whole_cache, False
        if p is None or p["cache"] is None or whole:  # whole: the cache already holds every prompt position
            return output
        s = self.stats
        for i, layer, new in stand_for_prompt(p["cache"], p["kept"], p["length"], self.info.num_kv_heads, self):
            s.add_kv_layer(i, s.prompt_tokens, s.kept_tokens, new.physical_length,
                           int(kv_bytes(layer) * p["length"] / max(layer.keys.shape[-2], 1)), kv_bytes(new))
        return output

    def check_ran(self) -> None:
        """After the model's forward: a call that carried images must have reached the rewrite."""
        self.inputs.check(self.method.name)
