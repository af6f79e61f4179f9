"""The method registry: every published method registers itself with its paper."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import StageError

_REGISTRY: dict[str, type] = {}


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


def register(cls):
    """Class decorator: adds a method class to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all():
    from .. import methods  # noqa: F401  (importing registers every method)


def list_methods(stage: str | None = None) -> list[MethodInfo]:
    _load_all()
    infos = [cls.info() for cls in _REGISTRY.values()]
    return sorted((i for i in infos if stage is None or i.stage == stage), key=lambda i: (i.stage, i.name))


def get_method(name: str, **params):
    """A configured method by registry name, e.g. ``get_method("tome", r=8)``."""
    _load_all()
    if name not in _REGISTRY:
        raise StageError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)
