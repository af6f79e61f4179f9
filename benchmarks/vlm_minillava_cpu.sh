#!/bin/sh
# Visual-token methods on the mini-LLaVA, CPU. Accuracy runs (both tasks at once, one thread each), then a paired
# prefill-timing run at 10 % of the visual tokens. Results: benchmarks/results/vlm_{scenes,easyvqa,timing}$TAG/.
# N (questions, default 200), METHODS (default: every connector and in-LLM method), TAG (output suffix),
# TIMING_METHODS (default: the methods that reach 10 %).
set -e
N=${N:-200}
METHODS=${METHODS:-fastervlm,visionzip,visual_random,visual_pool,fastv,pyramiddrop,llavolta,visiondrop,sparsevlm}
TIMING_METHODS=${TIMING_METHODS:-fastervlm,visionzip,fastv,llavolta}
TAG=${TAG:-}
R=benchmarks/results
OMP_NUM_THREADS=1 .venv/bin/tokenreduce bench vlm --task scenes --methods $METHODS --budgets 0.5,0.25,0.1 --n $N \
    --no-timing --no-progress --out $R/vlm_scenes$TAG > $R/vlm_scenes$TAG.log 2>&1 &
OMP_NUM_THREADS=1 .venv/bin/tokenreduce bench vlm --task easyvqa --methods $METHODS --budgets 0.5,0.25,0.1 --n $N \
    --no-timing --no-progress --out $R/vlm_easyvqa$TAG > $R/vlm_easyvqa$TAG.log 2>&1 &
wait
.venv/bin/tokenreduce bench vlm --task scenes --methods $TIMING_METHODS --budgets 0.1 --n 16 \
    --batch-size 8 --timing-repeats 5 --no-progress --out $R/vlm_timing$TAG > $R/vlm_timing$TAG.log 2>&1
