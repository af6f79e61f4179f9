"""One module per published method. Importing this package registers them all."""

from . import (  # noqa: F401
    a2ats,
    baselines,
    dymu,
    evit,
    fastervlm,
    gemfilter,
    h2o,
    keyformer,
    knorm,
    kv_random,
    kvcrush,
    mctf,
    pyramidkv,
    snapkv,
    streaming_llm,
    token_transforming,
    tome,
    tova,
    visionzip,
    visual_baselines,
)
