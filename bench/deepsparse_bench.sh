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
args() {  # the prune arguments of each model name
    case $1 in
        wanda50) echo --sparsity_ratio 0.5 ;;
        wanda70) echo --sparsity_ratio 0.7 ;;
        atp70) echo --sparsity_ratio 0.7 --allocation atp --atp_beta 0.016 ;;
        *) echo "unknown model $1 (wanda50, wanda70 or atp70)" >&2; exit 2 ;;
    esac
}
MODELS=${MODELS:-wanda70 wanda50 atp70}
for m in $MODELS; do args "$m" >/dev/null; done  # every name checked before any work
case ${BF16:=0} in 0) bf16=--no_bf16; suffix= ;; 1) bf16=; suffix=_bf16 ;;
    *) echo "BF16 must be 0 or 1, got $BF16" >&2; exit 2 ;; esac
for m in $MODELS; do  # prune only the models asked for, once
    a=$(args "$m")
    [ -f "bench/work/$m/model.safetensors" ] || $S --quiet prune --model smollm2-135m --prune_method wanda \
        --nsamples 64 --seqlen 512 --eval none --save_model "bench/work/$m" $a
done
for m in $MODELS; do
    $S --quiet bench --model "bench/work/$m" --baseline smollm2-135m --threads "$THREADS" --repeats 3 \
        --deepsparse $bf16 --save "bench/results/speed_ds_${m}_t${THREADS}${suffix}"
done
