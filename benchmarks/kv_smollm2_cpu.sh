#!/bin/sh
# The KV-cache closing measurement: every prefill-time and decode-time kv method at 50/75/90 % compression,
# both settings, 20 needles at 3k tokens, SmolLM2-135M-Instruct on CPU (about 50 min on 2 quiet cores).
set -e
cd "$(dirname "$0")/.."
.venv/bin/tokenreduce bench kv --lengths 3000 --n 20 --ratios 0.5,0.25,0.1 --setting both \
    --out benchmarks/results/kv_smollm2_3k --no-progress "$@"
