#!/bin/sh
# Visual-token methods on the mini-LLaVA, CPU. Accuracy runs (both tasks at once, one thread each), then a paired
# prefill-timing run at 10 % of the visual tokens. Results: benchmarks/results/vlm_{scenes,easyvqa,timing}/.
set -e
N=${N:-200}
METHODS=fastervlm,visionzip,visual_random,visual_pool,fastv,pyramiddrop
OMP_NUM_THREADS=1 .venv/bin/tokenreduce bench vlm --task scenes --methods $METHODS --budgets 0.5,0.25,0.1 --n $N \
    --no-timing --no-progress --out benchmarks/results/vlm_scenes > benchmarks/results/vlm_scenes.log 2>&1 &
OMP_NUM_THREADS=1 .venv/bin/tokenreduce bench vlm --task easyvqa --methods $METHODS --budgets 0.5,0.25,0.1 --n $N \
    --no-timing --no-progress --out benchmarks/results/vlm_easyvqa > benchmarks/results/vlm_easyvqa.log 2>&1 &
wait
.venv/bin/tokenreduce bench vlm --task scenes --methods fastervlm,visionzip,fastv,pyramiddrop --budgets 0.1 --n 16 \
    --batch-size 8 --timing-repeats 5 --no-progress --out benchmarks/results/vlm_timing
