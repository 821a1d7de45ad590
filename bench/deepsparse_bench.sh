#!/usr/bin/env bash
# Issue 5's speed benchmark with DeepSparse: SmolLM2-135M dense against Wanda 50% / 70% (uniform) and ATP 70%
# (β = 0.016, the β ATP's search chose at 70% in BENCHMARKS.md §5), all from 64 C4 windows of 512 tokens.
# Each `sparsellm bench` measures PyTorch fp32 (and bf16 with BF16=1) and DeepSparse, dense and sparse, in one run.
# Needs `make venv` and `make deepsparse-env`.
set -euo pipefail
cd "$(dirname "$0")/.."
S=.venv/bin/sparsellm
THREADS=${THREADS:-2}
mkdir -p bench/work
prune() {  # name, extra prune arguments
    [ -f "bench/work/$1/model.safetensors" ] && return
    $S --quiet prune --model smollm2-135m --prune_method wanda --nsamples 64 --seqlen 512 --eval none \
        --save_model "bench/work/$1" "${@:2}"
}
prune wanda50 --sparsity_ratio 0.5
prune wanda70 --sparsity_ratio 0.7
prune atp70 --sparsity_ratio 0.7 --allocation atp --atp_beta 0.016
for m in ${MODELS:-wanda70 wanda50 atp70}; do
    $S --quiet bench --model "bench/work/$m" --baseline smollm2-135m --threads "$THREADS" --repeats 3 \
        --deepsparse $([ "${BF16:-0}" = 1 ] || echo --no_bf16) --save "bench/results/speed_ds_${m}_t${THREADS}"
done
