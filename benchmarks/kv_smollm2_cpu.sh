#!/bin/sh
# The KV-cache closing measurement: every prefill-time and decode-time kv method at 50/75/90 % compression,
# 20 needles at 3k tokens, SmolLM2-135M-Instruct on CPU. The two settings run as two one-thread processes side
# by side (about 40 min on 2 cores); each keeps its own full-cache rows, so every ratio is measured in one process.
set -e
cd "$(dirname "$0")/.."
for setting in aware agnostic; do
    OMP_NUM_THREADS=1 .venv/bin/tokenreduce bench kv --lengths 3000 --n 20 --ratios 0.5,0.25,0.1 --setting $setting \
        --out benchmarks/results/kv_smollm2_3k_$setting --no-progress "$@" > benchmarks/results/kv_smollm2_3k_$setting.log 2>&1 &
done
wait
