"""A per-layer visual-token schedule as data: which layers drop visual tokens and how many they keep.

A `LayerSchedule` has the meaning of `LayerDropMethod.schedule`: ``drops`` is ``((K, fraction), ...)``
with drop layers ``K`` (0-based) ascending and, from layer ``K`` on, ``fraction`` of the *original*
visual tokens kept (non-increasing from one drop to the next). Layers before the first drop keep
every visual token. Any in-LLM method runs a schedule (``get_method("fastv", schedule=...)``) with
its own scoring; a schedule search (`tokenreduce.search`) returns one.

A schedule is saved as a small versioned JSON file (``FORMAT`` / ``VERSION``)::

    {"format": "tokenreduce.schedule", "version": 1,
     "drops": [[2, 0.5], [12, 0.125]],          # (layer, fraction of the original visual tokens kept)
     "num_layers": 30,                           # the language model it was made for (None: not recorded)
     "visual_tokens": 144,                       # the visual tokens per image it was made for (None: not recorded)
     "mean_kept": 0.3,                           # derived, for reading only (keep_ratio's meaning)
     "source": {"search": "g-search", "method": "fastv", "model": "minillava", "task": "scenes",
                "split": "calib", "calibration_n": 64, "objective": "accuracy", "params": {...}, "seed": 0, ...}}

``source`` records what produced the schedule; `load` checks the format, the version and the
drops, and keeps ``source`` as it is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from .errors import BudgetError
from .params import is_int, is_real

FORMAT = "tokenreduce.schedule"
VERSION = 1


def mean_kept(drops: Sequence[tuple[int, float]], num_layers: int) -> float:
    """The fraction of visual tokens kept averaged over ``num_layers`` layers (``keep_ratio``'s meaning inside the
    language model): every visual token before the first drop layer, ``fraction`` from each drop layer on."""
    total, cur, prev = 0.0, 1.0, 0
    for layer, frac in drops:
        total += (layer - prev) * cur
        prev, cur = layer, frac
    return (total + (num_layers - prev) * cur) / num_layers


def fit_schedule(make, target: float, num_layers: int, hi: float = 1.0) -> list[tuple[int, float]]:
    """The schedule ``make(t)`` whose `mean_kept` meets ``target``: ``t`` in ``(0, hi]`` by bisection, ``make``'s
    mean growing with ``t`` (the smallest ``t`` found whose mean is at least the target, to 60 halvings)."""
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_kept(make(mid), num_layers) < target:
            lo = mid
        else:
            hi = mid
    return make(hi)


def one_drop(method: str, num_layers: int, k: int, keep_ratio: float | None = None, r: float | None = None,
             k_name: str = "k") -> list[tuple[int, float]]:
    """The schedule of a method that drops once, at layer ``k`` (FastV's shape): ``r`` of the visual tokens
    dropped there, or the ``r`` that makes ``keep_ratio`` the mean kept over the layers,
    ``r = (1 - keep_ratio) L / (L - k)``; `BudgetError` if ``k`` is beyond the layers or ``keep_ratio`` below
    ``k / L``."""
    n = num_layers
    if k >= n:
        raise BudgetError(f"{method}: {k_name}={k} is beyond this language model's {n} layers; use {k_name} <= {n - 1}")
    if r is None:
        r = (1.0 - keep_ratio) * n / (n - k)
        if r >= 1.0:
            raise BudgetError(f"{method}: keep_ratio={keep_ratio} needs dropping {r:.2f} of the visual tokens at layer "
                              f"{k_name}={k} of {n}; the lowest reachable is {k / n:.3f}: raise keep_ratio or lower "
                              f"{k_name}")
    return [(k, 1.0 - r)]


def kept_count(visual_tokens: int, fraction: float) -> int:
    """Visual tokens an image of ``visual_tokens`` keeps at ``fraction``: floor, at least 1 (the runtime's rule)."""
    return min(visual_tokens, max(1, math.floor(visual_tokens * fraction + 1e-9)))


def check_drops(drops, where: str = "schedule") -> tuple[tuple[int, float], ...]:
    """``drops`` as a tuple of ``(int layer, float fraction)``, or a `BudgetError` saying what is wrong."""
    if isinstance(drops, (str, bytes, Mapping)) or not isinstance(drops, (Sequence, tuple, list)):
        raise BudgetError(f"{where}: drops must be a list of (layer, fraction kept) pairs, e.g. "
                          f"[(2, 0.5), (12, 0.25)]; got {drops!r}")
    out: list[tuple[int, float]] = []
    for i, pair in enumerate(drops):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise BudgetError(f"{where}: drop {i} must be a (layer, fraction kept) pair; got {pair!r}")
        layer, frac = pair
        if not is_int(layer) or layer < 1:
            raise BudgetError(f"{where}: drop {i} has layer {layer!r}; a drop layer is an integer >= 1 (0-based; "
                              "layer 0 has no previous layer to score with)")
        if not is_real(frac) or not math.isfinite(float(frac)) or not 0.0 < float(frac) <= 1.0:
            raise BudgetError(f"{where}: drop {i} (layer {layer}) keeps {frac!r}; a kept fraction of the original "
                              "visual tokens is in (0, 1]")
        if out and int(layer) <= out[-1][0]:
            raise BudgetError(f"{where}: drop layers must be strictly ascending; layer {int(layer)} comes after layer "
                              f"{out[-1][0]}")
        if out and float(frac) > out[-1][1]:
            raise BudgetError(f"{where}: kept fractions must not increase with depth (dropped tokens do not come "
                              f"back); layer {int(layer)} keeps {float(frac):g} after layer {out[-1][0]} kept "
                              f"{out[-1][1]:g}")
        out.append((int(layer), float(frac)))
    return tuple(out)


@dataclass(frozen=True)
class LayerSchedule:
    """Drop layers and the fraction of the original visual tokens kept from each on (see the module docstring)."""

    drops: tuple[tuple[int, float], ...]
    num_layers: int | None = None  # the language model's layers it was made for (checked against the drops)
    visual_tokens: int | None = None  # visual tokens per image it was made for (recorded, not enforced)
    source: Mapping[str, Any] = field(default_factory=dict, hash=False)  # what produced it

    def __post_init__(self):
        drops = check_drops(self.drops)
        object.__setattr__(self, "drops", drops)
        for name in ("num_layers", "visual_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise BudgetError(f"schedule: {name} must be an integer >= 1 or None; got {value!r}")
        if self.num_layers is not None:
            self.check(self.num_layers)
        if not isinstance(self.source, Mapping):
            raise BudgetError(f"schedule: source must be a mapping (what produced the schedule); got {self.source!r}")
        object.__setattr__(self, "source", MappingProxyType(_jsonable(dict(self.source))))  # JSON types: saves as is

    # ------------------------------------------------------------------ reading
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.drops)

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(f for _, f in self.drops)

    def __len__(self) -> int:
        return len(self.drops)

    def pairs(self) -> list[tuple[int, float]]:
        """``[(layer, fraction), ...]``: what `LayerDropMethod.schedule` returns."""
        return list(self.drops)

    def check(self, num_layers: int, where: str = "schedule") -> "LayerSchedule":
        """Raise `BudgetError` if a drop layer is beyond a language model of ``num_layers`` layers."""
        beyond = [k for k in self.layers if k >= num_layers]
        if beyond:
            made = f" (it was made for {self.num_layers} layers)" if self.num_layers else ""
            raise BudgetError(f"{where}: drop layer {beyond[0]} is beyond this language model's {num_layers} layers "
                              f"(0..{num_layers - 1}){made}; use a schedule found for this model")
        return self

    def mean_kept(self, num_layers: int | None = None) -> float:
        """The fraction of visual tokens kept averaged over the layers (``keep_ratio``'s meaning); 1.0 for no drop."""
        n = num_layers if num_layers is not None else self.num_layers
        if n is None:
            raise BudgetError("schedule: mean_kept needs num_layers (the schedule does not record its model's depth)")
        self.check(n)
        return mean_kept(self.drops, n)

    def kept_counts(self, visual_tokens: int, num_layers: int | None = None) -> list[int]:
        """Visual tokens each layer processes for an image of ``visual_tokens`` (floor, at least 1, as the runtime)."""
        n = num_layers if num_layers is not None else self.num_layers
        if n is None:
            raise BudgetError("schedule: kept_counts needs num_layers")
        self.check(n)
        counts, cur, at = [], visual_tokens, dict(self.drops)
        for layer in range(n):
            if layer in at:
                cur = kept_count(visual_tokens, at[layer])
            counts.append(cur)
        return counts

    def describe(self) -> str:
        """One line: the drops in short, and what produced it."""
        if not self.drops:
            body = "no drop"
        elif len(self.drops) <= 3:
            body = ", ".join(f"{k}:{f:.3g}" for k, f in self.drops)
        else:
            (k0, f0), (k1, f1) = self.drops[0], self.drops[-1]
            body = f"{len(self.drops)} drops, {k0}:{f0:.3g} .. {k1}:{f1:.3g}"
        by = self.source.get("search")
        return f"schedule[{body}]" + (f" from {by}" if by else "")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "drops": [[k, f] for k, f in self.drops],
                               "num_layers": self.num_layers, "visual_tokens": self.visual_tokens}
        if self.num_layers is not None:
            out["mean_kept"] = mean_kept(self.drops, self.num_layers)
        out["source"] = _jsonable(dict(self.source))
        return out

    def to_json(self, indent: int | None = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if indent is None:
            return text
        # lists of numbers (each drop, layer lists) on one line; a raw newline is never inside a JSON string
        return re.sub(r"\[(\n[\s\d.eE+,-]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "schedule") -> "LayerSchedule":
        if not isinstance(data, Mapping):
            raise BudgetError(f"{where}: expected a JSON object with \"format\": \"{FORMAT}\"; "
                              f"got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise BudgetError(f"{where}: not a tokenreduce schedule (\"format\" is {data.get('format')!r}, expected "
                              f"{FORMAT!r})")
        version = data.get("version")
        if not is_int(version) or not 1 <= version <= VERSION:
            raise BudgetError(f"{where}: schedule version {version!r} is not supported (this tokenreduce reads "
                              f"versions 1..{VERSION}); upgrade tokenreduce or search again")
        if "drops" not in data:
            raise BudgetError(f"{where}: the schedule has no \"drops\"")
        drops = check_drops(data["drops"], where)
        return cls(drops, data.get("num_layers"), data.get("visual_tokens"), data.get("source") or {})

    @classmethod
    def from_json(cls, text: str, where: str = "schedule") -> "LayerSchedule":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BudgetError(f"{where}: not valid JSON ({e})") from e
        return cls.from_dict(data, where)


def load(path: str | Path) -> LayerSchedule:
    """A schedule saved by `LayerSchedule.save` (`BudgetError` for a file that is not one; `FileNotFoundError` if absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no schedule file at {path}")
    return LayerSchedule.from_json(path.read_text(encoding="utf-8"), where=str(path))


def as_schedule(value, where: str = "schedule") -> LayerSchedule:
    """A `LayerSchedule` from a `LayerSchedule`, a list of ``(layer, fraction)`` pairs, or the path of a saved one."""
    if isinstance(value, LayerSchedule):
        return value
    if isinstance(value, (str, Path)):
        try:
            return load(value)
        except FileNotFoundError as e:
            raise BudgetError(f"{where}: {e}") from e
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise BudgetError(f"{where} must be a LayerSchedule, a list of (layer, fraction kept) pairs such as "
                          f"[(2, 0.5), (12, 0.25)], or the path of a saved schedule; got {value!r}")
    return LayerSchedule(check_drops(value, where))


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
