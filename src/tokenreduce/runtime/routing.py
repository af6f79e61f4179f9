"""One attention routing layer for every stage: several listeners per attention module, one undo.

transformers looks attention functions up by name in its registry (``AttentionInterface``);
we register one, ``"tokenreduce"``, once. A routed attention module gets an instance-level
shallow copy of its config naming that function (the model's shared config, and with it the
masks transformers builds, stay those of the original implementation: SDPA or eager), plus
an ordered list of listeners. Our function calls the listeners as a chain: each gets the
call's Q, K, V and mask and a ``proceed`` callable that runs the rest of the chain, the last
link being the model's own implementation. A listener may observe (compute a few attention
rows from Q and K), change the mask, replace the call (an attention override), or stop the
module (a probe). Listeners are removed one by one in any order; when the last one goes the
module is exactly as before.
"""

from __future__ import annotations

import copy
import inspect
import sys
import weakref
from contextlib import contextmanager
from typing import Callable

from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.errors import StageError, UnsupportedModelError
from ..core.undo import Undo

IMPL = "tokenreduce"
_ROUTES = "_tokenreduce_routes"  # [(listener, index), ...] on a routed attention module
_ORIGINAL = "_tokenreduce_impl"  # the implementation the module used before it was routed
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


def original_attention(module: nn.Module, impl: str | None = None) -> Callable:
    """The attention function ``module`` used before routing (``impl`` overrides the recorded name)."""
    impl = module.__dict__.get(_ORIGINAL, "sdpa") if impl is None else impl
    if impl in (None, "eager"):
        # the model file's own eager function, so results stay bit for bit those of the model
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[impl]


def _call(module, routes, i, query, key, value, attention_mask, **kwargs):
    if i == len(routes):
        return original_attention(module)(module, query, key, value, attention_mask, **kwargs)
    listener, index = routes[i]

    def proceed(q, k, v, mask, **kw):
        return _call(module, routes, i + 1, q, k, v, mask, **kw)

    return listener.attend(index, module, query, key, value, attention_mask, proceed, **kwargs)


def _attention_function(module, query, key, value, attention_mask, **kwargs):
    routes = module.__dict__.get(_ROUTES)
    return _call(module, tuple(routes or ()), 0, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPL, _attention_function)


def check_implementation(config, who: str) -> str:
    """The model's attention implementation, if our attention function can wrap it (else a clear refusal)."""
    impl = config._attn_implementation
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModelError(f"{who} run(s) with attn_implementation in {SUPPORTED_IMPLEMENTATIONS}; this model "
                                    f"uses {impl!r}: load it with attn_implementation='sdpa'")
    return impl


def route(attn: nn.Module, listener, index: int, undo: Undo) -> None:
    """Add ``listener.attend(index, module, q, k, v, mask, proceed, **kw)`` to ``attn``'s chain; undone by ``undo``."""
    d = attn.__dict__
    if d.get(_ROUTES) is None:
        impl = attn.config._attn_implementation
        if impl == IMPL:
            raise StageError(f"{type(attn).__name__}'s config names the tokenreduce attention function but the module "
                             "is not routed; was a routed config copied onto another model?")
        cfg = copy.copy(attn.config)  # shallow: only this module sees "tokenreduce"
        cfg._attn_implementation_internal = IMPL  # direct: the setter would recurse into sub-configs
        if "config" not in d:
            raise UnsupportedModelError(f"{type(attn).__name__} keeps no config of its own; cannot route its attention")
        d[_ORIGINAL], d["_tokenreduce_config"], d[_ROUTES] = impl, d["config"], []
        d["config"] = cfg
    routes = d[_ROUTES]
    if any(l is listener for l, _ in routes):
        raise StageError(f"{type(attn).__name__} is already routed to this attachment")
    entry = (listener, index)
    routes.append(entry)
    ref = weakref.ref(attn)

    def unroute():
        module = ref()
        if module is None:
            return
        md = module.__dict__
        current = md.get(_ROUTES)
        if current is None:
            return
        for i, e in enumerate(current):
            if e is entry:
                del current[i]
                break
        if not current:
            md["config"] = md.pop("_tokenreduce_config")
            md.pop(_ROUTES, None)
            md.pop(_ORIGINAL, None)

    undo.append(unroute)


def call_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A backbone call's arguments by name (its ``**kwargs`` flattened in), as a forward pre-hook sees them."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    out = {k: v for k, v in bound.items() if k != "kwargs"}
    out.update(bound.get("kwargs", {}))
    return out


# ---------------------------------------------------------------------------- probe passes
_probing: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextmanager
def probe_pass(module: nn.Module):
    """Mark a forward of ``module`` that only gathers signals (GemFilter's filter pass): other stages ignore it."""
    _probing.add(module)
    try:
        yield
    finally:
        _probing.discard(module)


def is_probing(module: nn.Module) -> bool:
    return module in _probing
