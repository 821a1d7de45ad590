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
# Perplexity on all 148 windows, re-pruning each row with the rates it recorded (23-31 min per row here);
# BENCHMARKS.md §5 quotes the rows that have been run; each setting takes the same command.
for f in wanda:0.7 sparsegpt:0.7 wanda:0.6 sparsegpt:0.6 wanda:0.5 sparsegpt:0.5; do
    m=${f%%:*}; s=${f##*:}
    .venv/bin/python bench/layerwise_bench.py --method "$m" --sparsity "$s" --full_eval \
        --out "bench/results/layerwise_${m}$(python3 -c "print(round($s*100))").json"
done
# The SparseGPT 70% OWL rates re-pruned with the old micro-batch of 16 windows (8192 tokens), first 16 windows
mkdir -p bench/work
python3 -c "import json; r = json.load(open('bench/results/layerwise_sparsegpt70.json'))['runs']
print(json.dumps(next(x['rates'] for x in r if x['allocation'] == 'owl')))" > bench/work/owl70_rates.json
.venv/bin/sparsellm --quiet allocate --model smollm2-135m --prune_method sparsegpt --sparsity_ratio 0.7 \
    --allocation file:bench/work/owl70_rates.json --nsamples 32 --seqlen 512 --eval wikitext2 --eval_seqlen 2048 \
    --max_windows 16 --batch_size 16 --save bench/work/owl70_batch16 --overwrite
cp bench/work/owl70_batch16/report.json bench/results/layerwise_sparsegpt70_owl_batch16_check.report.json
# The Wanda 60% RMI rates re-pruned with the same old micro-batch (its re-prune at the new default moved 0.2%)
python3 -c "import json; r = json.load(open('bench/results/layerwise_wanda60.json'))['runs']
print(json.dumps(next(x['rates'] for x in r if x['allocation'] == 'rmi')))" > bench/work/rmi60_rates.json
.venv/bin/sparsellm --quiet allocate --model smollm2-135m --prune_method wanda --sparsity_ratio 0.6 \
    --allocation file:bench/work/rmi60_rates.json --nsamples 32 --seqlen 512 --eval wikitext2 --eval_seqlen 2048 \
    --max_windows 16 --batch_size 16 --save bench/work/rmi60_batch16 --overwrite
cp bench/work/rmi60_batch16/report.json bench/results/layerwise_wanda60_rmi_batch16_check.report.json
.venv/bin/python bench/layerwise_bench.py --table bench/results/layerwise_*.json
