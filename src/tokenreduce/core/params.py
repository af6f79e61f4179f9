"""Checks of method parameters, run by every method's ``__init__`` before any model work.

Each check returns the value normalised (``int``, ``float``, ``bool``, a tuple) or raises with a
message that names the method, the parameter, what it accepts and what it got::

    self.window_size = check_int(self.name, "window_size", window_size, min=1)

Booleans are never numbers here: ``True`` is rejected wherever an integer or a float is expected.
Budgets (``keep_ratio``, ``keep_count``, ToMe's ``r``, ...) raise `BudgetError` (``error=BudgetError``),
everything else `ParameterError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

from .errors import ParameterError

SEED_MAX = 2**32 - 1  # seeds are integers in [0, SEED_MAX]


def is_bool(value) -> bool:
    """``bool`` or a NumPy bool (neither counts as a number in these checks)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not is_bool(value)


def fail(method: str, name: str, accepted: str, value, error: type[Exception] = ParameterError, why: str = "",
         optional: bool = False):
    """Raise ``error``: "<method>: <name> must be <accepted> (<why>)[ or None]; got <value>"."""
    plain = (numbers.Number, str, type(None), list, tuple, dict, set, range)
    got = f"{value!r}" if isinstance(value, plain) and not is_bool(value) else f"{value!r} ({type(value).__name__})"
    raise error(f"{method}: {name} must be {accepted}{f' ({why})' if why else ''}{' or None' if optional else ''}; "
                f"got {got}")


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _int_range(lo, hi, odd: bool = False) -> str:
    kind = "an odd integer" if odd else "an integer"
    if lo is not None and hi is not None:
        return f"{kind} in [{lo}, {hi}]"
    if lo is not None:
        return f"{kind} >= {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


def check_int(method: str, name: str, value, *, min: int | None = None, max: int | None = None, odd: bool = False,
              optional: bool = False, error: type[Exception] = ParameterError, why: str = "") -> int | None:
    """An integer (not a bool) in ``[min, max]`` (odd if ``odd``); None too if ``optional``."""
    if value is None and optional:
        return None
    ok = is_int(value) and (min is None or value >= min) and (max is None or value <= max) and (not odd or value % 2 == 1)
    if not ok:
        fail(method, name, _int_range(min, max, odd), value, error, why, optional)
    return int(value)


def check_float(method: str, name: str, value, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False, optional: bool = False,
                error: type[Exception] = ParameterError, why: str = "") -> float | None:
    """A finite real number (int or float, not a bool) within the bounds; None too if ``optional``."""
    if value is None and optional:
        return None
    ok = is_real(value) and math.isfinite(value)
    if ok and min is not None:
        ok = value > min if min_open else value >= min
    if ok and max is not None:
        ok = value < max if max_open else value <= max
    if not ok:
        if min is not None and max is not None:
            rng = f"in {'(' if min_open else '['}{_num(min)}, {_num(max)}{')' if max_open else ']'}"
        elif min is not None:
            rng = f"{'>' if min_open else '>='} {_num(min)}"
        elif max is not None:
            rng = f"{'<' if max_open else '<='} {_num(max)}"
        else:
            rng = ""
        fail(method, name, f"a number {rng}".rstrip(), value, error, why, optional)
    return float(value)


def check_bool(method: str, name: str, value, *, why: str = "") -> bool:
    """``True`` or ``False`` (a NumPy bool too; not 0/1, not a string)."""
    if not is_bool(value):
        fail(method, name, "True or False", value, why=why)
    return bool(value)


def check_choice(method: str, name: str, value, choices: Iterable, *, why: str = ""):
    """One of ``choices`` (compared by type and value, so ``True`` is not ``1``)."""
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        fail(method, name, "one of " + ", ".join(repr(c) for c in choices), value, why=why)
    return value


def check_seed(method: str, name: str, value) -> int:
    return check_int(method, name, value, min=0, max=SEED_MAX)


def check_ints(method: str, name: str, value, *, min: int | None = 0, optional: bool = False,
               why: str = "") -> tuple[int, ...] | None:
    """A list, tuple or range of integers (each >= ``min``), returned as a tuple; None too if ``optional``."""
    if value is None and optional:
        return None
    ok = isinstance(value, (Sequence, range, set, frozenset)) and not isinstance(value, (str, bytes)) \
        and all(is_int(v) and (min is None or v >= min) for v in value)
    if not ok:
        each = "integers" if min is None else f"integers >= {min}"
        fail(method, name, f"a list of {each}", value, why=why, optional=optional)
    return tuple(int(v) for v in value)


def check_fractions(method: str, name: str, value, *, optional: bool = False, why: str = "") -> tuple[float, ...] | None:
    """A non-empty list or tuple of numbers in (0, 1], returned as a tuple of floats; None too if ``optional``."""
    if value is None and optional:
        return None
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0 \
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in value)
    if not ok:
        fail(method, name, "a list of numbers in (0, 1]", value, why=why, optional=optional)
    return tuple(float(v) for v in value)


def check_per_layer_r(method: str, name: str, value, *, optional: bool = True,
                      error: type[Exception] | None = None) -> int | list | tuple | None:
    """ToMe's ``r``: an integer >= 0 (tokens merged per block), a list of them (one per block), or
    ``(r, inflect)`` with ``inflect`` in [-1, 1] (``core.budget.tome_schedule``)."""
    from .errors import BudgetError

    error = error or BudgetError
    accepted = ("an integer >= 0 (tokens merged per block), a list of such integers (one per block), "
                "a pair (r, inflect) with inflect in [-1, 1]")
    if value is None and optional:
        return None
    if is_int(value):
        if value < 0:
            fail(method, name, accepted, value, error, optional=optional)
        return int(value)
    if isinstance(value, tuple) and len(value) == 2:
        r, inflect = value
        if not (is_int(r) and r >= 0 and is_real(inflect) and -1.0 <= inflect <= 1.0):
            fail(method, name, accepted, value, error, optional=optional)
        return (int(r), float(inflect))
    if isinstance(value, (list, tuple)) and all(is_int(v) and v >= 0 for v in value):
        return type(value)(int(v) for v in value)
    fail(method, name, accepted, value, error, optional=optional)


def check_mapping(method: str, name: str, value, *, optional: bool = True, forbidden: Iterable[str] = (),
                  why: str = "") -> dict | None:
    """A dict with string keys (None too if ``optional``), none of them in ``forbidden``."""
    if value is None and optional:
        return None
    forbidden = tuple(forbidden)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value) \
            or any(k in value for k in forbidden):
        accepted = "a dict of keyword arguments" + (f" without {' or '.join(forbidden)}" if forbidden else "")
        fail(method, name, accepted, value, why=why, optional=optional)
    return dict(value)
