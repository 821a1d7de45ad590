#!/usr/bin/env bash
# The part of run_layerwise.sh that the issue-3 session could run after the SparseGPT uniform row: a coarser ATP grid.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python bench/layerwise_bench.py --method sparsegpt --sparsity 0.7 --allocations owl,rmi,atp --atp_step 0.008 \
    --out bench/results/layerwise_sparsegpt70_part2.json
.venv/bin/python bench/layerwise_bench.py --method wanda --sparsity 0.5 --atp_step 0.008 --out bench/results/layerwise_wanda50.json
