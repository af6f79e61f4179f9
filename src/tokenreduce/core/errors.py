"""Errors that say what is wrong and what to do. All derive from `TokenReduceError`."""


class TokenReduceError(Exception):
    """Base class of every error tokenreduce raises on purpose."""


class UnsupportedModelError(TokenReduceError, TypeError):
    """The model (or this part of it) has no adapter for the requested stage."""


class BudgetError(TokenReduceError, ValueError):
    """A budget is out of its documented range or contradicts another parameter."""


class StageError(TokenReduceError, ValueError):
    """A method was attached to a model or stage it cannot serve."""


class ParameterError(BudgetError, StageError):
    """A method parameter has the wrong type or is out of its range (see `core.params`).

    It derives from `BudgetError` and `StageError` because such mistakes raised one or the
    other before it existed, so existing ``except`` clauses still catch it.
    """


class UnknownParameterError(ParameterError, TypeError):
    """A keyword that the method does not take (a `TypeError` too, as Python raises for one)."""


class NeverFiredError(TokenReduceError, RuntimeError):
    """A method was attached, the model ran, and the method never reduced anything."""


class MissingDependencyError(TokenReduceError, ImportError):
    """An optional dependency is not installed."""


class CalibrationError(TokenReduceError, RuntimeError):
    """A method that needs calibration was used before it was calibrated."""


class BenchError(TokenReduceError, ValueError):
    """A benchmark's saved files do not fit the run asked for (e.g. resuming another run's checkpoint)."""


def require(module: str, extra: str | None = None):
    """Import an optional dependency or say exactly what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        hint = f"pip install 'tokenreduce[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(f"this feature needs the optional package '{module}': {hint} ({e})") from e
