"""Attach methods to a model and take them off again, exactly.

``with tokenreduce.apply(model, *methods) as h: ...`` attaches, runs, and on exit — also on
an exception — restores the model: the same modules, the same config, the same outputs bit
for bit. ``tokenreduce.patch`` returns the same handle for long-lived use; ``h.remove()``.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .errors import StageError, UnsupportedModelError
from .method import EncoderMethod, KVMethod, Method
from .stats import Stats


class Handle:
    """The attached methods of one model. ``stats`` describes the last forward."""

    def __init__(self, model: nn.Module, methods: list[Method], track_source: bool = False):
        from ..adapters import find_encoders
        from ..adapters.encoder import EncoderAttachment

        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"tokenreduce attaches to torch.nn.Module models; got {type(model).__name__}")
        if not methods:
            raise StageError("apply()/patch() needs at least one method, e.g. tokenreduce.get_method('tome', keep_ratio=0.5)")
        for m in methods:
            if not isinstance(m, Method):
                raise StageError(f"expected a tokenreduce method (see tokenreduce.list_methods()); got {m!r}")
        by_stage: dict[str, list[Method]] = {}
        for m in methods:
            by_stage.setdefault(m.stage, []).append(m)
        unknown = set(by_stage) - {"encoder", "decoder", "kv-cache"}
        if unknown:
            raise StageError(f"no stage adapter for {sorted(unknown)} methods yet; supported stages: encoder, decoder, "
                             "kv-cache")
        decoder_methods = by_stage.get("decoder", [])
        if len(decoder_methods) > 1 or (decoder_methods and by_stage.get("kv-cache")):
            raise StageError(f"one decoder-stage method per model, not combined with a kv-cache method (yet); got "
                             f"{', '.join(repr(m) for m in decoder_methods + by_stage.get('kv-cache', []))}")
        kv_methods = [m for m in by_stage.get("kv-cache", []) if isinstance(m, KVMethod)]
        if len(kv_methods) > 1:
            raise StageError(f"one kv-cache method per model at a time; got {', '.join(repr(m) for m in kv_methods)}")
        self.model = model
        self.methods = list(methods)
        self._attachments = []
        self._hooks = []
        try:
            encoder_methods = [m for m in by_stage.get("encoder", []) if isinstance(m, EncoderMethod)]
            if encoder_methods:
                encoders = find_encoders(model)
                if len(encoders) > 1:
                    raise UnsupportedModelError(
                        f"{type(model).__name__} holds {len(encoders)} encoders; attach to the vision tower itself")
                family, _owner, blocks, config = encoders[0]
                self._attachments.append(EncoderAttachment(model, family, blocks, config, encoder_methods, track_source))
            if kv_methods:
                from ..adapters.decoder import DecoderAttachment, find_decoder

                family, backbone = find_decoder(model)
                if getattr(kv_methods[0], "retrieval", False):  # decode-time retrieval (A²ATS): the full cache stays
                    from ..adapters.kv_retrieval import KVRetrievalAttachment

                    self._attachments.append(KVRetrievalAttachment(model, family, backbone, kv_methods[0]))
                else:
                    self._attachments.append(DecoderAttachment(model, family, backbone, kv_methods[0]))
            if decoder_methods:  # prefill filtering (GemFilter): pick prompt tokens in an early layer, prefill those
                from ..adapters.decoder import find_decoder
                from ..adapters.prefill_filter import PrefillFilterAttachment

                family, backbone = find_decoder(model)
                self._attachments.append(PrefillFilterAttachment(model, family, backbone, decoder_methods[0]))
            self._hooks.append(model.register_forward_hook(self._after_forward))
        except Exception:
            self.remove()
            raise

    def _after_forward(self, module, args, output):
        for a in self._attachments:
            a.check_ran()

    @property
    def stats(self) -> Stats:
        """Tokens and FLOPs of the last forward (still readable after the methods are removed).

        For a kv-cache method: what the last compressed prefill kept (``kv_*`` fields); decoding
        steps leave it as it is.
        """
        return self._attachments[0].stats if self._attachments else Stats()

    @property
    def source(self):
        """The source map of the last forward (a composed `Reduction` from the input), when tracked."""
        a = self._attachments[0]
        tokens = getattr(a, "tokens", None)
        return tokens.source if tokens is not None else None

    def remove(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        for a in self._attachments:
            a.remove()  # idempotent: its undo stack empties

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def patch(model: nn.Module, *methods: Method, track_source: bool = False) -> Handle:
    """Attach ``methods`` until ``handle.remove()``."""
    return Handle(model, list(methods), track_source=track_source)


@contextmanager
def apply(model: nn.Module, *methods: Method, track_source: bool = False):
    """Attach ``methods`` for the ``with`` block; the model is restored exactly on exit."""
    handle = Handle(model, list(methods), track_source=track_source)
    try:
        yield handle
    finally:
        handle.remove()
