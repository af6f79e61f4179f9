"""One module per published method. Importing this package registers them all."""

from . import baselines, dymu, evit, h2o, knorm, kv_random, mctf, snapkv, streaming_llm, token_transforming, tome, tova  # noqa: F401
