#!/usr/bin/env bash
# Issue 3 benchmark: uniform / OWL / ATP (searched β) / RMI under Wanda and SparseGPT on SmolLM2-135M,
# 32 C4 windows of 512 tokens, WikiText-2 ppl on the first 16 windows of 2048. One setting after another.
# ATP grid step: 0.004 for Wanda, 0.008 for SparseGPT (each SparseGPT trial costs ~3 min here); the paper's is 0.002.
set -euo pipefail
cd "$(dirname "$0")/.."
for job in wanda:0.7 sparsegpt:0.7 wanda:0.5 sparsegpt:0.5 wanda:0.6 sparsegpt:0.6; do
    m=${job%%:*}; s=${job##*:}
    step=$([ "$m" = wanda ] && echo 0.004 || echo 0.008)
    .venv/bin/python bench/layerwise_bench.py --method "$m" --sparsity "$s" --atp_step "$step" \
        --out "bench/results/layerwise_${m}$(python3 -c "print(round($s*100))").json"
done
# Perplexity on all 148 windows, re-pruning each row with the rates it recorded (~15 min per row here):
#   .venv/bin/python bench/layerwise_bench.py --method wanda --sparsity 0.7 --full_eval --out bench/results/layerwise_wanda70.json
.venv/bin/python bench/layerwise_bench.py --table bench/results/layerwise_*.json
