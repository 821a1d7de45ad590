#!/usr/bin/env bash
# Zero-shot accuracy (lm-eval on the bundled tasks, first LIMIT documents of each) of dense SmolLM2-135M and
# of Wanda 50% (64 C4 windows of 512 tokens), then PyTorch speed of the pruned model against the dense one.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-100}
OUT=bench/results/zeroshot_limit${LIMIT}
mkdir -p "$OUT" bench/work
S=.venv/bin/sparsellm
$S --quiet eval zeroshot --model smollm2-135m --limit "$LIMIT" --save "$OUT/dense"
$S --quiet prune --model smollm2-135m --prune_method wanda --sparsity_ratio 0.5 --nsamples 64 --seqlen 512 \
    --eval wikitext2,zeroshot --eval_seqlen 2048 --max_windows 16 --limit "$LIMIT" \
    --save_model bench/work/wanda50 --overwrite --save "$OUT/wanda50"
$S --quiet bench --model bench/work/wanda50 --baseline smollm2-135m --threads 2 --repeats 3 \
    --save bench/results/speed_wanda50
