"""The method registry: every published method registers itself with its paper."""

from __future__ import annotations

import difflib
import inspect
import sys
from dataclasses import dataclass

from .errors import StageError, UnknownParameterError

_REGISTRY: dict[str, type] = {}

# The stages, in the order tokens flow through a model (the order `apply` composes them in); "text" (the prompt
# before tokenisation) is planned. `list_methods` accepts these and the stages of registered methods.
STAGES: tuple[str, ...] = ("encoder", "connector", "decoder", "kv-cache")
LISTED_STAGES: tuple[str, ...] = STAGES + ("text",)

REQUIRED = inspect.Parameter.empty  # the "default" of a parameter that has none


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stage: str
    paper: str
    arxiv: str | None
    training_free: bool
    needs_calibration: bool
    signals: tuple[str, ...]
    native_params: tuple[str, ...]
    defaults: tuple[tuple[str, object], ...] = ()  # (name, default) of each native param, in signature order

    @property
    def params(self) -> dict[str, object]:
        """Native parameters and their defaults (`REQUIRED` for one without a default)."""
        return dict(self.defaults)

    def params_text(self) -> str:
        """``r=None, prop_attn=True``: the native parameters with their defaults."""
        return ", ".join(name if d is REQUIRED else f"{name}={d!r}" for name, d in self.defaults)


def method_params(cls) -> list[tuple[str, object]]:
    """(name, default) of every keyword ``cls`` takes (``keep_ratio`` included), in signature order."""
    return [(p.name, p.default) for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def register(cls):
    """Class decorator: adds a method class to the registry under ``cls.name``.

    A class without a docstring of its own gets its module's (each method module's docstring is
    its paper summary and its differences from the reference code), so ``help(method)`` and
    ``inspect.getdoc`` show it.
    """
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    from .method import check_signals

    check_signals(cls)
    module_doc = getattr(sys.modules.get(cls.__module__), "__doc__", None)
    if module_doc and not cls.__dict__.get("__doc__"):
        cls.__doc__ = module_doc
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type]:
    """Every registered method class by name."""
    _load_all()
    return dict(_REGISTRY)


def _load_all():
    from .. import methods  # noqa: F401  (importing registers every method)


def _did_you_mean(word, known) -> str:
    word, known = str(word), [str(k) for k in known]
    close = difflib.get_close_matches(word, known, n=3)
    if len(word) >= 2:  # a prefix or a part ("kv" for "kv-cache") is close too
        close = list(dict.fromkeys(close + [k for k in known if word.lower() in k.lower()]))[:3]
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def stages() -> tuple[str, ...]:
    """Every stage `list_methods` knows: those of registered methods and the planned ones."""
    _load_all()
    return tuple(dict.fromkeys(LISTED_STAGES + tuple(sorted({c.stage for c in _REGISTRY.values()}))))


def list_methods(stage: str | None = None) -> list[MethodInfo]:
    """Every registered method (or those of ``stage``, one of `stages`), sorted by stage and name."""
    _load_all()
    known = stages()
    if stage is not None and stage not in known:
        raise StageError(f"unknown stage {stage!r}; {_did_you_mean(stage, known)}stages: {', '.join(known)}")
    infos = [cls.info() for cls in _REGISTRY.values()]
    return sorted((i for i in infos if stage is None or i.stage == stage), key=lambda i: (i.stage, i.name))


def get_method(name: str, **params):
    """A configured method by registry name, e.g. ``get_method("tome", r=8)``.

    Unknown names and keywords raise at once (with the closest known ones), and every method
    checks its parameters' types and ranges in its constructor, before any model work.
    """
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise StageError(f"unknown method {name!r}; {_did_you_mean(name, _REGISTRY)}known methods: "
                         f"{', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    accepted = method_params(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = [k for k in params if k not in dict(accepted)]
    if unknown and not takes_any:
        listed = ", ".join(n if d is REQUIRED else f"{n}={d!r}" for n, d in accepted)
        raise UnknownParameterError(f"{name} has no parameter {unknown[0]!r}; "
                                    f"{_did_you_mean(unknown[0], dict(accepted))}its parameters: {listed}")
    return cls(**params)
