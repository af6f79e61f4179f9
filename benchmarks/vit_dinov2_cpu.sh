#!/usr/bin/env bash
# The encoder-stage table in the README and in the issue notes: every encoder method at
# keep_ratio 0.75 and 0.5 on the real DINOv2-S/14, Fashion-MNIST at 224 px (2,000-image
# kNN/probe bank, 500 test images), 9 photos for fidelity, CPU, batch 32.
# About 35 minutes on 2 cores (the bank's features are cached after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/tokenreduce bench vit --budgets 0.75,0.5 --n-train 2000 --n-test 500 --batch-size 32 \
    --timing-batches 3 --out "${1:-results/vit-full}"
