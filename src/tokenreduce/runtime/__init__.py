"""The runtime: one routing layer for attention, one attachment per stage, `apply`/`patch` to compose them.

`routing` (the attention chain), `encoder` (the encoder stage), `kv_cache` (kv-cache
compression at prefill and eviction while decoding), `kv_retrieval` (decode-time retrieval),
`prefill_filter` (the decoder stage's prompt filtering), `attach` (`Handle`, `apply`,
`patch`), `prefill_once` (one prefill, many compressed caches: the benchmark path).
"""

from .attach import STAGES, Handle, apply, patch
from .prefill_once import prefill_once

__all__ = ["STAGES", "Handle", "apply", "patch", "prefill_once"]
