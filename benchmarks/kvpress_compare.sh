#!/usr/bin/env bash
# Side by side with NVIDIA's kvpress (from PyPI): the same SmolLM2-135M-Instruct weights, the same
# needle samples, the same prompt token ids, the same greedy decoding code; SnapKV, StreamingLLM,
# TOVA, key-norm and random eviction at 50/75/90 % compression (+ the full cache), question-agnostic
# (the context is compressed, the question comes after). Prints and writes a Markdown table:
# accuracy, answer agreement, prefill s and decode ms/token on each side, and the overlap of the
# entries SnapKV keeps.
#
# kvpress needs transformers < 5.3 and we use 5.x, so kvpress runs in its own environment,
# .cache/kvpress-venv (made here on the first run: ~2 GB, a few minutes).
# Defaults: 10 samples x 16 settings x 2 sides at ~1k tokens, ~50 minutes on the 2 shared CPU cores (one sample
# at a time, alternating sides).
#
#   benchmarks/kvpress_compare.sh [--n 10] [--length 1000] [--compressions 0.5,0.75,0.9]
#                                 [--methods snapkv,streaming_llm,tova,knorm,kv_random]
#                                 [--threads 1] [--out results/kvpress-compare]
#                                 [--md benchmarks/results/kvpress_compare.md] [--setup-only]
# --threads 1 (default) on both sides: on a shared machine one thread each gives steadier timings.
set -euo pipefail
cd "$(dirname "$0")/.."

KVPRESS_VERSION=0.5.5          # newest on PyPI when written; needs transformers >=4.56,<5.3
TRANSFORMERS_SPEC='transformers==4.57.6'  # newest 4.x (kvpress 0.5.5 allows >=4.56,<5.3)
TORCH_SPEC='torch==2.13.0'     # the CPU build our own venv uses, so timings compare like with like
VENV=.cache/kvpress-venv
OURS=.venv/bin/python

N=10; LENGTH=1000; COMPRESSIONS=0.5,0.75,0.9; METHODS=snapkv,streaming_llm,tova,knorm,kv_random
OUT=results/kvpress-compare; MD=benchmarks/results/kvpress_compare.md; SETUP_ONLY=0; THREADS=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --n) N=$2; shift 2 ;;
        --length) LENGTH=$2; shift 2 ;;
        --compressions) COMPRESSIONS=$2; shift 2 ;;
        --methods) METHODS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --md) MD=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -x $OURS ]]; then
    echo "our venv is missing: $OURS (create it and 'pip install -e .' first)" >&2; exit 1
fi
if [[ ! -f $VENV/.ready-$KVPRESS_VERSION ]]; then
    echo "== creating $VENV (kvpress==$KVPRESS_VERSION, $TRANSFORMERS_SPEC, $TORCH_SPEC)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
    "$VENV/bin/pip" install -q "kvpress==$KVPRESS_VERSION" "$TRANSFORMERS_SPEC" "$TORCH_SPEC" \
        2> >(grep -v "^WARNING: Location" >&2)
    touch "$VENV/.ready-$KVPRESS_VERSION"
fi
[[ $SETUP_ONLY == 1 ]] && exit 0

MODEL_DIR=$($OURS -c "from tokenreduce.assets.llm import load_smollm2, smollm2_cache_path; load_smollm2(); print(smollm2_cache_path())")
rm -rf "$OUT/ours" "$OUT/kvpress"
mkdir -p "$OUT/ours" "$OUT/kvpress"
COMMON=(--samples "$OUT/samples.jsonl" --compressions "$COMPRESSIONS" --methods "$METHODS" --threads "$THREADS")

echo "== samples -> $OUT/samples.jsonl"
$OURS benchmarks/kvpress_ours.py --make-samples --n "$N" --length "$LENGTH" --samples "$OUT/samples.jsonl"
# One sample at a time, alternating sides, so a change in the machine's load hits both alike.
for ((i = 0; i < N; i++)); do
    echo "== sample $((i + 1))/$N: ours (tokenreduce)"
    $OURS benchmarks/kvpress_ours.py "${COMMON[@]}" --index $i --out "$OUT/ours/$i.jsonl"
    echo "== sample $((i + 1))/$N: kvpress"
    "$VENV/bin/python" benchmarks/kvpress_side.py "${COMMON[@]}" --model "$MODEL_DIR" --index $i \
        --out "$OUT/kvpress/$i.jsonl"
done
echo "== comparison"
$OURS benchmarks/kvpress_compare.py --dir "$OUT" --md "$MD" \
    --command "benchmarks/kvpress_compare.sh --n $N --length $LENGTH --compressions $COMPRESSIONS --methods $METHODS --threads $THREADS"
