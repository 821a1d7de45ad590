#!/usr/bin/env bash
# Issue 3 benchmark: uniform / OWL / ATP (searched β) / RMI under Wanda and SparseGPT on SmolLM2-135M,
# 32 C4 windows of 512 tokens, WikiText-2 ppl on the first 16 windows of 2048. One setting after another.
set -euo pipefail
cd "$(dirname "$0")/.."
for job in wanda:0.7 sparsegpt:0.7 wanda:0.5 sparsegpt:0.5 wanda:0.6 sparsegpt:0.6; do
    m=${job%%:*}; s=${job##*:}
    .venv/bin/python bench/layerwise_bench.py --method "$m" --sparsity "$s" \
        --out "bench/results/layerwise_${m}$(python3 -c "print(round($s*100))").json"
done
