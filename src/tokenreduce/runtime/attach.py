"""Attach methods to a model and take them off again, exactly.

``with tokenreduce.apply(model, *methods) as h: ...`` attaches, runs, and on exit — also on
an exception — restores the model: the same modules, the same config, the same outputs bit
for bit. ``tokenreduce.patch`` returns the same handle for long-lived use; ``h.remove()``.

Methods of different stages compose in one call, in the order tokens flow (`STAGES`):
the vision tower (encoder), where visual tokens enter the language model (connector),
inside the language model (decoder: prompt filtering), and the KV cache (kv-cache). One
attachment serves each stage; several encoder methods share one tower and run in the order
given (rules in `runtime.encoder`). A prefill filter (GemFilter) followed by a kv-cache
method filters the prompt first and then compresses the filtered cache.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..core.errors import StageError, UnsupportedModelError
from ..core.method import (
    ConnectorMethod,
    EncoderMethod,
    KVMethod,
    LayerDropMethod,
    Method,
    PrefillFilterMethod,
    RetrievalMethod,
    UnmergeMethod,
)
from ..core.registry import STAGES
from ..core.stats import Stats, combine



_OWNER = "_tokenreduce_handle"  # on a decoder backbone: the handle whose decoder-side stages hook it


class Handle:
    """The attached methods of one model. ``stats`` / ``stats_by_stage`` describe the last forward."""

    def __init__(self, model: nn.Module, methods: list[Method], track_source: bool = False):
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"tokenreduce attaches to torch.nn.Module models; got {type(model).__name__}")
        by_stage = _group(methods)
        self.model = model
        self.methods = list(methods)
        self.track_source = track_source
        self._stages: dict[str, object] = {}
        self._hooks = []
        self._removed = False
        self._entered = False
        self._claimed: nn.Module | None = None
        try:
            self._forward_params = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            self._forward_params = set()
        try:
            self._attach(model, by_stage, track_source)
            self._hooks.append(model.register_forward_hook(self._after_forward, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def _attach(self, model, by_stage: dict[str, list[Method]], track_source: bool) -> None:
        from ..families.decoders import find_decoder
        from ..families.encoders import find_encoders
        from ..families.vlms import find_vlm

        for m in by_stage.get("decoder", []):  # a pipeline method (dymu_vtu) brings its own tower method
            if isinstance(m, UnmergeMethod) and m.tower is not None:
                if any(t is m.tower for t in by_stage.get("encoder", [])):
                    raise StageError(f"{m.tower!r} is {m!r}'s own tower method; pass {m.name} alone")
                by_stage.setdefault("encoder", []).append(m.tower)
        if by_stage.get("encoder"):
            from .encoder import EncoderAttachment

            encoders = find_encoders(model)
            if len(encoders) > 1:
                raise UnsupportedModelError(
                    f"{type(model).__name__} holds {len(encoders)} encoders; attach to the vision tower itself")
            family, _owner, blocks, config = encoders[0]
            vlm = find_vlm(model)
            reducing = [m for m in by_stage["encoder"] if not m.reduces_nothing]
            if vlm is not None and reducing and not vlm.family.tower_reduction:
                raise UnsupportedModelError(
                    f"{reducing[0]!r} would reduce inside the vision tower of a {vlm.family.name} model, whose projector "
                    "does not read the tower's tokens one to one (the patch grid is reshaped after the tower); tower "
                    "methods run inside LLaVA(-1.5-style) models only: reduce this model's visual tokens with a "
                    "connector or in-LLM method (tokenreduce list --stage connector / decoder)")
            if vlm is not None and reducing:
                # inside a VLM the tower reduces before its select layer (the block whose output the projector reads);
                # the connector stage then hands the language model the reduced visual tokens
                from .connector import select_block

                blocks = list(blocks)[:select_block(vlm.inner.config, len(blocks))]
                if not blocks:
                    raise StageError(f"{reducing[0]!r}: the tower's select layer is its first block; nothing to reduce")
                track_source = True
            self._stages["encoder"] = EncoderAttachment(model, family, blocks, config, by_stage["encoder"], track_source)
        if by_stage.get("connector") or by_stage.get("decoder") or by_stage.get("kv-cache"):
            family, backbone = find_decoder(model)
            self._claim(backbone)
        tower = self._stages.get("encoder") if by_stage.get("encoder") and any(
            not m.reduces_nothing for m in by_stage["encoder"]) else None
        if tower is not None and find_vlm(model) is not None and not by_stage.get("connector"):
            family, backbone = find_decoder(model)  # the connector stage drops what the tower took away
            self._claim(backbone)
            by_stage["connector"] = [None]
        if by_stage.get("connector"):  # first: its backbone hook rewrites the prompt every later stage sees
            from ..families.vlms import require_vlm
            from .connector import ConnectorAttachment

            method = by_stage["connector"][0]
            parts = require_vlm(model, method.name if method is not None else "a tower reduction")
            vlm_tower = tower if tower is not None and find_vlm(model) is not None else None
            self._stages["connector"] = ConnectorAttachment(model, parts, family, backbone, method, vlm_tower)
        if by_stage.get("decoder"):  # before the kv stage: its backbone hook rewrites the prompt the kv stage sees
            method = by_stage["decoder"][0]
            if isinstance(method, UnmergeMethod):
                from ..families.vlms import require_vlm
                from .unmerge import UnmergeAttachment

                if by_stage.get("kv-cache"):
                    raise StageError(f"{method!r} keeps the whole prompt's cache as the reference does; composing it "
                                     f"with {by_stage['kv-cache'][0]!r} is not supported yet")
                self._stages["decoder"] = UnmergeAttachment(model, require_vlm(model, method.name), family, backbone,
                                                            method, after=self._stages.get("connector"))
            elif isinstance(method, LayerDropMethod):
                from ..families.vlms import require_vlm
                from .in_llm import InLLMAttachment

                if by_stage.get("kv-cache"):
                    raise StageError(f"{method!r} drops visual tokens inside the language model; composing it with "
                                     f"{by_stage['kv-cache'][0]!r} is not supported yet (a kv-cache stage would cut "
                                     "its pruned layers again). Use one of them, or tower and connector methods with "
                                     "it")
                self._stages["decoder"] = InLLMAttachment(model, require_vlm(model, method.name), family, backbone,
                                                          method, after=self._stages.get("connector"))
            else:
                from .prefill_filter import PrefillFilterAttachment

                if by_stage.get("connector"):
                    raise StageError(f"{method!r} filters the whole prompt; it cannot follow a connector method "
                                     f"({by_stage['connector'][0]!r}) that already rewrote it")
                self._stages["decoder"] = PrefillFilterAttachment(model, family, backbone, method)
        if by_stage.get("kv-cache"):
            method = by_stage["kv-cache"][0]
            if isinstance(method, RetrievalMethod):  # decode-time retrieval (A²ATS): the full cache stays
                from .kv_retrieval import KVRetrievalAttachment

                if "decoder" in self._stages:
                    raise StageError(f"{method!r} retrieves from the whole prompt's cache at every step; it cannot "
                                     "follow a prefill filter. Rule: a prefill filter composes with kv-cache methods "
                                     "that compress at prefill or evict while decoding")
                self._stages["kv-cache"] = KVRetrievalAttachment(model, family, backbone, method)
            else:
                from .kv_cache import DecoderAttachment

                if "decoder" in self._stages and method.repositions:
                    raise StageError(f"{method!r} re-positions the cache from position 0, which the filtered prompt "
                                     "does not start at; use streaming_llm(rolling=False) after a prefill filter")
                self._stages["kv-cache"] = DecoderAttachment(model, family, backbone, method)

    def _claim(self, backbone: nn.Module) -> None:
        """One handle per decoder: two handles' decoder-side stages would hook the same backbone in the wrong order."""
        owner = backbone.__dict__.get(_OWNER)
        if owner is not None and owner is not self:
            raise StageError(f"this {type(backbone).__name__} already has decoder-side methods attached by another "
                             f"apply()/patch() ({', '.join(map(repr, owner.methods))}); pass all methods to one apply() "
                             "(they compose: a prefill filter, then a kv-cache method), or remove the other handle first")
        backbone.__dict__[_OWNER] = self
        self._claimed = backbone

    # ------------------------------------------------------------------ after every forward of the model
    def _after_forward(self, module, args, kwargs, output):
        # the encoder must have run when the call carried images, or when the model is an encoder alone; a decoding
        # step of a vision-language model runs no tower, and that is not a miss
        images = kwargs.get("pixel_values") is not None or "past_key_values" not in self._forward_params
        for stage, a in self._stages.items():
            if stage == "encoder":
                a.check_ran(required=images)
            else:
                a.check_ran()

    # ------------------------------------------------------------------ what the last forward did
    @property
    def stats(self) -> Stats:
        """Every stage's last forward in one `Stats` (see `core.stats.combine`); readable after removal."""
        return combine([a.stats for a in self._stages.values()])

    @property
    def stats_by_stage(self) -> dict[str, Stats]:
        """Each attached stage's own `Stats`, by stage name ("encoder", "decoder", "kv-cache")."""
        return {stage: a.stats for stage, a in self._stages.items()}

    @property
    def source(self):
        """The encoder's source map of the last forward (a composed `Reduction` from the input), when tracked.

        Only the encoder stage merges tokens; the kv-cache stage records instead which entries
        each layer kept (``CompressedLayer.kept`` on the cache, ``stats.kv_kept_per_layer``)."""
        enc = self._stages.get("encoder")
        tokens = getattr(enc, "tokens", None)
        return tokens.source if tokens is not None else None

    @property
    def attachments(self) -> dict[str, object]:
        """The stage attachments, by stage name (for inspection and tests)."""
        return dict(self._stages)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Take every method off the model (idempotent); the model is exactly as before."""
        while self._hooks:
            self._hooks.pop().remove()
        for a in reversed(list(self._stages.values())):
            a.remove()
        claimed, self._claimed = self._claimed, None
        if claimed is not None and claimed.__dict__.get(_OWNER) is self:
            del claimed.__dict__[_OWNER]
        self._removed = True

    def __enter__(self):
        if self._removed:
            raise StageError("this handle was removed: its methods are no longer attached, so the block would run the "
                             "plain model. Attach again: `with tokenreduce.apply(model, *methods) as h:`")
        if self._entered:
            raise StageError("this handle is already in use by an open `with` block")
        self._entered = True
        return self

    def __exit__(self, *exc):
        self._entered = False
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return f"Handle({type(self.model).__name__}, {', '.join(map(repr, self.methods))}; {state})"


class _Applied:
    """What `apply` returns: attaches on ``__enter__``, removes on ``__exit__``; enters once."""

    def __init__(self, model, methods, track_source):
        _group(methods)  # argument errors at the call, before any `with`
        self._args = (model, methods, track_source)
        self._used = False

    def __enter__(self) -> Handle:
        if self._used:
            raise StageError("this tokenreduce.apply(...) context was already entered once; call "
                             "tokenreduce.apply(model, *methods) again for a new `with` block")
        self._used = True
        model, methods, track_source = self._args
        self._handle = Handle(model, methods, track_source=track_source)
        return self._handle

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def patch(model: nn.Module, *methods: Method, track_source: bool = False) -> Handle:
    """Attach ``methods`` until ``handle.remove()``."""
    return Handle(model, list(methods), track_source=track_source)


def apply(model: nn.Module, *methods: Method, track_source: bool = False) -> _Applied:
    """Attach ``methods`` for the ``with`` block; the model is restored exactly on exit."""
    return _Applied(model, list(methods), track_source)


# ---------------------------------------------------------------------------- helpers
def _group(methods: list[Method]) -> dict[str, list[Method]]:
    """Methods by stage, checked: known stages, at most one prefill filter and one kv-cache method."""
    if not methods:
        raise StageError("apply()/patch() needs at least one method, e.g. tokenreduce.get_method('tome', keep_ratio=0.5)")
    for m in methods:
        if not isinstance(m, Method):
            raise StageError(f"expected a tokenreduce method (see tokenreduce.list_methods()); got {m!r}")
    by_stage: dict[str, list[Method]] = {}
    for m in methods:
        by_stage.setdefault(m.stage, []).append(m)
    ready = {"encoder": EncoderMethod, "connector": ConnectorMethod,
             "decoder": (PrefillFilterMethod, LayerDropMethod, UnmergeMethod),
             "kv-cache": KVMethod}
    unknown = [s for s in by_stage if s not in ready]
    if unknown:
        raise StageError(f"no runtime for {sorted(unknown)} methods yet; the stages that run today are "
                         f"{', '.join(ready)} (composed in the order {' -> '.join(STAGES)})")
    for stage, ms in by_stage.items():
        for m in ms:
            if not isinstance(m, ready[stage]):
                names = " or ".join(c.__name__ for c in (ready[stage] if isinstance(ready[stage], tuple) else (ready[stage],)))
                raise StageError(f"{m!r} says it is a {stage} method but does not implement that stage's contract "
                                 f"({names})")
    for stage, what in (("connector", "connector method"), ("decoder", "decoder-stage method (prefill filter or "
                                                                      "in-LLM visual pruning)"),
                        ("kv-cache", "kv-cache method")):
        if len(by_stage.get(stage, [])) > 1:
            raise StageError(f"one {what} per model; got {', '.join(repr(m) for m in by_stage[stage])}. Rule: each "
                             "decoder-side stage holds one method; compose across stages instead (e.g. gemfilter then "
                             "snapkv)")
    return by_stage


