#!/usr/bin/env bash
# Zero-shot accuracy (lm-eval, bundled tasks, first LIMIT documents each) of dense SmolLM2-135M and of
# Wanda / SparseGPT 50% (64 C4 windows of 512 tokens), plus PyTorch speed of the pruned model vs dense.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-200}
OUT=bench/results/zeroshot_limit${LIMIT}
mkdir -p "$OUT"
S=.venv/bin/sparsellm
$S --quiet eval zeroshot --model smollm2-135m --limit "$LIMIT" --save "$OUT/dense"
for m in wanda sparsegpt; do
    $S --quiet prune --model smollm2-135m --prune_method $m --sparsity_ratio 0.5 --nsamples 64 --seqlen 512 \
        --eval wikitext2,zeroshot --eval_seqlen 2048 --max_windows 16 --limit "$LIMIT" \
        --save_model "bench/work/${m}50" --overwrite --save "$OUT/${m}50"
done
