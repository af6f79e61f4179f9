"""tokenreduce — training-free token reduction for transformers, one API, measured.

    import tokenreduce
    with tokenreduce.apply(model, tokenreduce.get_method("tome", keep_ratio=0.5)) as h:
        out = model(pixel_values)
    print(h.stats.flops_ratio, h.stats.tokens_per_layer)

    with tokenreduce.apply(llm, tokenreduce.get_method("snapkv", keep_ratio=0.25)) as h:
        out = llm.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # the cache is compressed once
    print(h.stats.kv_bytes_ratio, h.stats.kv_kept_per_layer)
"""

from .runtime.attach import STAGES, Handle, apply, patch
from .runtime.calibration import calibrate
from .runtime.prefill_once import prefill_once
from .core.budget import KeepCount, KeepRatio, Schedule, Threshold
from .core.errors import (BudgetError, CalibrationError, MissingDependencyError, NeverFiredError, ParameterError,
                          StageError, TokenReduceError, UnknownParameterError, UnsupportedModelError)
from .core.reduction import Reduction
from .core.registry import MethodInfo, get_method, list_methods

__version__ = "0.1.0"

__all__ = ["apply", "patch", "Handle", "STAGES", "prefill_once", "calibrate", "get_method", "list_methods", "MethodInfo", "Reduction", "KeepRatio",
           "KeepCount", "Schedule", "Threshold", "TokenReduceError", "UnsupportedModelError", "BudgetError",
           "StageError", "ParameterError", "UnknownParameterError", "NeverFiredError", "MissingDependencyError",
           "CalibrationError"]
