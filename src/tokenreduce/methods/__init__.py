"""One module per published method. Importing this package registers them all."""

from . import gemfilter  # noqa: F401
from . import baselines, dymu, evit, h2o, keyformer, knorm, kv_random, kvcrush, mctf, pyramidkv, snapkv, streaming_llm, token_transforming, tome, tova  # noqa: F401
