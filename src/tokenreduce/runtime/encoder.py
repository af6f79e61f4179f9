"""Encoder stage: reduce tokens between attention and MLP inside every block of a ViT-like encoder.

How it attaches (all undone exactly by `EncoderAttachment.remove`):

* Each block gets an instance-level ``forward`` (the class is untouched). This is the one
  monkey-patch: the reduction sits *inside* the block, after the attention residual and
  before the MLP (where ToMe merges), and no hook reaches that point.
* The attention modules of those blocks are routed (`runtime.routing`) to `attend`, which
  adds the key bias (``log size`` for proportional attention, a mask for padded tokens),
  computes only the signals the methods asked for (keys, values, the [CLS] row, full
  probabilities) from Q, K and V, and then calls the model's own implementation (SDPA by
  default) — the model is never switched to eager.
* Methods may also reduce a block's *input*, before its attention
  (`EncoderMethod.reduce_before_attention`, MCTF's one-step-ahead fusion). They get a
  ``probe()`` that runs the block's own attention module on the current tokens only as far
  as the attention function: there the requested signals are computed from Q and K and a
  private exception stops the module (nothing after Q/K/V is computed). A method may return
  an attention override with its reduction: the block's attention then outputs
  ``override @ V`` (V from the reduced tokens) instead of calling SDPA.

A family (``families/vit.py`` …) says where the blocks are and how a block splits into its
attention part and MLP part; this module does the rest, once for all families.

Several methods in one tower run in the order given, at each block. A method that reduces
after another one at the same block sees that block's attention signals carried through
the earlier reduction (`Reduction.carry_signals`: attention received is summed over merged
tokens, keys, queries and values are averaged as the hidden states). Two rules are checked
before any work: a method that fixes a block's attention (``runs_alone``: MCTF) is the only
encoder method; a method that needs the intact patch grid (``needs_grid``: pool) reduces
before every other method does.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.errors import NeverFiredError, StageError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.stats import Stats, vit_attention_flops, vit_mlp_flops
from ..core.tokens import TokenState
from ..core.undo import Undo
from ..families.encoders import EncoderFamily
from ..scoring.attention import cls_attention, full_attention
from .routing import route


class _Probed(Exception):
    """Raised by the attention function in a probe, once the signals are taken: stops the module."""


class EncoderAttachment:
    """Encoder-stage methods attached to one encoder (a list of blocks)."""

    def __init__(self, model: nn.Module, family: EncoderFamily, blocks: nn.ModuleList, config, methods: list[EncoderMethod],
                 track_source: bool = False):
        self.family, self.blocks, self.config, self.methods = family, list(blocks), config, methods
        self.info = EncoderInfo(
            family=family.name, num_layers=len(self.blocks), hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_prefix=family.num_prefix(config), mlp_size=family.mlp_size(config),
        )
        check_composition(methods)
        for m in methods:
            m.check(self.info)
        self.track_source = track_source
        self.prop_attn = any(m.prop_attn for m in methods)
        self.stats = Stats()
        self.tokens: TokenState | None = None
        self.signals: dict = {}
        self._probing: set | None = None  # signal names while a probe runs
        self._override: Tensor | None = None  # attention probabilities the current block must use
        self._undo = Undo()
        self._ran = False
        self._attach()

    # ------------------------------------------------------------------ attach / remove
    def _attach(self):
        attns = [self.family.attention(b) for b in self.blocks]
        if any("forward" in b.__dict__ for b in self.blocks):
            raise StageError("this encoder already has tokenreduce methods attached (another apply() or patch() is "
                             "still open); pass all methods to one apply(), or remove the other handle first")
        try:
            for i, (block, attn) in enumerate(zip(self.blocks, attns)):
                self._undo.set_instance_attr(block, "forward", self._block_forward(i, block))
                route(attn, self, i, self._undo)
        except Exception:
            self.remove()
            raise

    def remove(self):
        self._undo.run()

    # ------------------------------------------------------------------ the forward
    def _block_forward(self, index: int, block: nn.Module):
        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            return self.run_block(index, block, hidden_states, attention_mask, *args, **kwargs)

        return forward

    def begin(self, x: Tensor):
        n = x.shape[1]
        self.tokens = TokenState.start(x, self.info.num_prefix, self.track_source)
        self.stats = Stats(batch_size=x.shape[0])
        self._n0 = n
        self._fired = {id(m): False for m in self.methods}
        grid = _square_grid(n - self.info.num_prefix)
        self._info_now = EncoderInfo(**{**self.info.__dict__, "patch_grid": grid})
        for m in self.methods:
            m.start(self._info_now, n)
        self._check_grid_order()

    def _check_grid_order(self):
        """A method that needs the intact patch grid must reduce before any other method does (checked per forward,
        before the first block: schedules are known once every method has started)."""
        first = {id(m): next((i for i in range(self.info.num_layers) if m.wants_signals(i)
                              or m.reduces_before_attention(i)), None) for m in self.methods}
        for pos, m in enumerate(self.methods):
            if not m.needs_grid or m.reduces_nothing or first[id(m)] is None:
                continue
            at = first[id(m)]
            for other_pos, o in enumerate(self.methods):
                j = first[id(o)]
                if o is m or o.reduces_nothing or j is None:
                    continue
                if j < at or (j == at and other_pos < pos):
                    raise StageError(f"{m!r} pools the intact patch grid at block {at}, but {o!r} reduces tokens "
                                     f"{'at an earlier block (' + str(j) + ')' if j < at else 'before it in the same block'}"
                                     f"; rule: a grid method reduces before every other encoder method — list it first "
                                     "and give it the earliest block (e.g. pool(kernel=2, layer=0))")

    def run_block(self, index: int, block: nn.Module, x: Tensor, attention_mask=None, *args, **kwargs):
        if index == 0:
            self.begin(x)
        state = self.tokens
        self._check_mask(attention_mask, state)
        for m in self.methods:
            if m.reduces_nothing:
                self._fired[id(m)] = True
        n_attn_real = float(state.counts().float().mean())
        self._override = None
        pre = [m for m in self.methods if not m.reduces_nothing and m.reduces_before_attention(index)]
        if pre:
            x = self._reduce_before_attention(index, block, x, attention_mask, pre, args, kwargs)
            self._check_mask(attention_mask, state)
        active = [m for m in self.methods if not m.reduces_nothing and m.wants_signals(index)]
        self._needs = set().union(*(m.signals for m in active)) if active else set()
        self.signals = {}
        n_attn, overridden = x.shape[1], self._override is not None
        try:
            x = self.family.attention_part(block, x, attention_mask, *args, **kwargs)
        finally:
            self._override = None
        for i, m in enumerate(active):
            red = m.reduce(index, x, state, self.signals)
            self._fired[id(m)] = True
            self.stats.scoring_flops += m.scoring_flops(index, x.shape[1], self._info_now)
            if red is not None:
                x = state.apply(red, x)
                if i + 1 < len(active):  # the next method scores the reduced tokens
                    self.signals = red.carry_signals(self.signals)
        self.signals = {}
        n_mlp = x.shape[1]
        x = self.family.mlp_part(block, x)
        self._record(n_attn, n_attn_real, n_mlp, float(state.counts().float().mean()), skip_qk=overridden)
        if index == len(self.blocks) - 1:
            self._finish()
        return x

    def _check_mask(self, attention_mask, state: TokenState):
        if attention_mask is not None and state.num_tokens != self._n0:
            raise StageError("the encoder was given an attention mask over its input tokens; token reduction changes "
                             "the token count, so per-token input masks are not supported at the encoder stage")

    def _reduce_before_attention(self, index, block, x, attention_mask, methods, args, kwargs) -> Tensor:
        """Let ``methods`` reduce the block input; at most the last reduction may bring an attention override."""
        state = self.tokens
        for m in methods:
            if self._override is not None:
                raise StageError(f"{m!r} reduces the input of block {index} after another method fixed that block's "
                                 "attention (an attention override); attach only one such method per block")
            probe = self._prober(block, x, attention_mask, args, kwargs, m.signals)
            n = x.shape[1]
            red, override = m.reduce_before_attention(index, x, state, probe)
            self._fired[id(m)] = True
            self.stats.scoring_flops += m.scoring_flops_before_attention(index, n, self._info_now)
            if red is not None:
                x = state.apply(red, x)
            if override is not None:
                if override.shape[-1] != x.shape[1] or override.shape[-2] != x.shape[1]:
                    raise StageError(f"{m!r} returned an attention override over {override.shape[-1]} tokens for a "
                                     f"block that now holds {x.shape[1]}")
                self._override = override
        return x

    def _prober(self, block, x, attention_mask, args, kwargs, default_names):
        """``probe(names=None) -> dict``: this block's attention signals on the tokens ``x``, computed once.

        Runs the family's attention part only up to the attention function (the module's Q/K/V
        projections of ``x`` and the signals; the key bias — log size, padding — is the block's
        own). Its work is added to ``stats.scoring_flops``: the three projections and, per
        signal, the Q K^T products it needs.
        """
        cache: dict = {}

        def probe(names=None) -> dict:
            names = tuple(default_names if names is None else names)
            missing = [n for n in names if n not in cache]
            if missing:
                self._probing = set(missing)
                self.signals = {}
                try:
                    self.family.attention_part(block, x, attention_mask, *args, **kwargs)
                except _Probed:
                    pass
                else:
                    raise StageError(f"probing the attention of a {self.info.family} block never reached the "
                                     "tokenreduce attention function")
                finally:
                    self._probing = None
                cache.update(self.signals)
                self.signals = {}
                self.stats.scoring_flops += _probe_flops(x.shape[1], self.info.hidden_size, missing)
            return {n: cache[n] for n in names}

        return probe

    def attend(self, index, module, query, key, value, attention_mask, proceed, **kwargs):
        state = self.tokens
        bias = state.key_bias(self.prop_attn and not state.uniform_sizes(), query.dtype) if state is not None else None
        if bias is not None:
            attention_mask = bias if attention_mask is None else attention_mask + bias
        if self._probing is not None:
            self._observe(query, key, value, attention_mask, kwargs.get("scaling"), self._probing)
            raise _Probed()
        if self._override is not None:  # a method fixed this block's attention (e.g. MCTF's merged map)
            probs = self._override.to(value.dtype)
            if self._needs:
                self._observe(query, key, value, attention_mask, kwargs.get("scaling"), self._needs, probs)
            return (probs @ value).transpose(1, 2).contiguous(), probs
        if self._needs:
            self._observe(query, key, value, attention_mask, kwargs.get("scaling"), self._needs)
        return proceed(query, key, value, attention_mask, **kwargs)

    def _observe(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None,
                 needs: set, probs: Tensor | None = None):
        """Only the attention rows the methods asked for, from Q and K (or the override ``probs``)."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if "keys" in needs:
            self.signals["keys"] = key
        if "queries" in needs:
            self.signals["queries"] = query
        if "values" in needs:
            self.signals["values"] = value
        if "cls_attn" in needs:
            self.signals["cls_attn"] = probs[:, :, 0] if probs is not None else cls_attention(query, key, mask, scale)
        if "attn" in needs:
            self.signals["attn"] = probs if probs is not None else full_attention(query, key, mask, scale)
        if "scale" in needs:
            self.signals["scale"] = scale

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, n_attn: int, n_attn_real: float, n_mlp: int, n_mlp_real: float, skip_qk: bool = False):
        c, f = self.info.hidden_size, self.info.mlp_size
        s = self.stats
        s.tokens_per_layer.append(n_attn_real)
        s.mlp_tokens_per_layer.append(n_mlp_real)
        s.flops += vit_attention_flops(n_attn, c) + vit_mlp_flops(n_mlp, c, f)
        if skip_qk:  # an attention override replaces Q K^T (the module still computes Q and K: counted)
            s.flops -= 2 * n_attn * n_attn * c
        s.flops_full += vit_attention_flops(self._n0, c) + vit_mlp_flops(self._n0, c, f)

    def _finish(self):
        self.stats.flops += self.stats.scoring_flops
        self._ran = True
        silent = [m for m in self.methods if not self._fired[id(m)]]
        if silent:
            names = ", ".join(repr(m) for m in silent)
            raise NeverFiredError(f"{names} never reduced in this forward of a {self.info.num_layers}-block "
                                  f"{self.info.family} encoder: its layers are outside the model's blocks; "
                                  "choose layers in range or a model with more blocks")

    def check_ran(self, required: bool = True):
        """Called after the model's forward: the encoder must have run with our blocks if the call ``required`` it
        (it carried images, or the model is the encoder). Whether each method fired is checked at the last block."""
        ran, self._ran = self._ran, False
        if required and not ran:
            raise NeverFiredError(
                f"the model ran but its {self.info.family} encoder blocks did not, so "
                f"{', '.join(m.name for m in self.methods)} never fired; call the model (or the vision tower) "
                "whose encoder the methods are attached to")


def check_composition(methods: list[EncoderMethod]) -> None:
    """Refuse, before any work, encoder methods that cannot share one tower (see the module docstring)."""
    seen: set[int] = set()
    for m in methods:
        if id(m) in seen:
            raise StageError(f"{m!r} is passed twice; a method object holds one forward's schedule and state — pass it "
                             "once, or pass two separately configured methods")
        seen.add(id(m))
    alone = [m for m in methods if getattr(m, "runs_alone", False)]
    if alone and len(methods) > 1:
        raise StageError(f"{alone[0]!r} fixes the attention of the blocks it fuses (one-step-ahead attention) and must "
                         f"be the only encoder method in its tower; got {', '.join(repr(m) for m in methods)}. Rule: "
                         "a method that overrides a block's attention runs alone")


def _probe_flops(n: int, hidden: int, names) -> float:
    """A probe's work on ``n`` tokens: the module's Q/K/V projections (keys, queries and values cost nothing more)
    plus the Q K^T its signals need."""
    flops = 2.0 * n * hidden * 3 * hidden
    if "attn" in names:
        flops += 2.0 * n * n * hidden
    elif "cls_attn" in names:
        flops += 2.0 * n * hidden
    return flops


def _square_grid(num_patches: int) -> tuple[int, int] | None:
    side = int(round(num_patches ** 0.5))
    return (side, side) if side * side == num_patches else None
