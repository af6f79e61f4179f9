"""tokenreduce — training-free token reduction for transformers, one API, measured.

    import tokenreduce
    with tokenreduce.apply(model, tokenreduce.get_method("tome", keep_ratio=0.5)) as h:
        out = model(pixel_values)
    print(h.stats.flops_ratio, h.stats.tokens_per_layer)

    with tokenreduce.apply(llm, tokenreduce.get_method("snapkv", keep_ratio=0.25)) as h:
        out = llm.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # the cache is compressed once
    print(h.stats.kv_bytes_ratio, h.stats.kv_kept_per_layer)
"""

from .core.attach import Handle, apply, patch
from .core.budget import KeepCount, KeepRatio, Schedule, Threshold
from .core.errors import (BudgetError, CalibrationError, MissingDependencyError, NeverFiredError, StageError,
                          TokenReduceError, UnsupportedModelError)
from .core.reduction import Reduction
from .core.registry import MethodInfo, get_method, list_methods

__version__ = "0.1.0"

__all__ = ["apply", "patch", "Handle", "get_method", "list_methods", "MethodInfo", "Reduction", "KeepRatio",
           "KeepCount", "Schedule", "Threshold", "TokenReduceError", "UnsupportedModelError", "BudgetError",
           "StageError", "NeverFiredError", "MissingDependencyError", "CalibrationError"]
