#!/usr/bin/env bash
# Every benchmark quoted in BENCHMARKS.md, one after another (never in parallel: timings need a quiet machine).
# Needs `make venv` and `make bench-env` (llmcompressor in its own venv) first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# 1. side by side with llmcompressor, small CPU setting (64 C4 windows of 512 tokens), ppl on 16 windows
$PY bench/prune_bench.py --jobs wanda:0.5,sparsegpt:0.5 --nsamples 64 --seqlen 512 \
    --eval_windows 16 --dense --llmc --out bench/results/vs_llmcompressor_64x512.json
# ... and again with the current micro-batch default (about 2048 tokens per forward)
$PY bench/prune_bench.py --jobs wanda:0.5 --nsamples 64 --seqlen 512 --eval_windows 16 --llmc \
    --out bench/results/vs_llmcompressor_64x512_v2.json
$PY bench/prune_bench.py --jobs sparsegpt:0.5 --nsamples 64 --seqlen 512 --eval_windows 16 --llmc \
    --out bench/results/vs_llmcompressor_64x512_v2_sparsegpt.json
# 2. dense perplexity on every WikiText-2 window at 2048
$PY bench/prune_bench.py --jobs "" --eval_windows 0 --dense --out bench/results/dense_full.json
# 3. the rest of the grid, same small setting (results are written after every job)
$PY bench/prune_bench.py --jobs magnitude:0.5,wanda:0.7,sparsegpt:0.7,magnitude:0.7,wanda:2:4,sparsegpt:2:4,magnitude:2:4,wanda:0.6,sparsegpt:0.6,magnitude:0.6 \
    --nsamples 64 --seqlen 512 --eval_windows 16 --out bench/results/grid_64x512.json
# 4. the papers' calibration setting (128 C4 windows of 2048 tokens), with the pruning process's RSS over time
$PY bench/rss_watch.py --interval 1 --out bench/results/paper_128x2048_wanda_rss.json -- \
    $PY bench/prune_bench.py --jobs wanda:0.5 --nsamples 128 --seqlen 2048 --eval_windows 16 \
    --out bench/results/paper_128x2048_wanda_v2.json
$PY bench/rss_watch.py --interval 1 --out bench/results/paper_128x2048_sparsegpt_rss.json -- \
    $PY bench/prune_bench.py --jobs sparsegpt:0.5 --nsamples 128 --seqlen 2048 --eval_windows 16 \
    --out bench/results/paper_128x2048_sparsegpt.json
# 5. layer-wise sparsity (issue 3): uniform / OWL / ATP search / RMI, Wanda and SparseGPT at 70/50/60%
bash bench/run_layerwise.sh
# 6. zero-shot accuracy (first 100 documents per task) and PyTorch speed of Wanda 50% against dense (issue 5)
bash bench/zeroshot_bench.sh
# 7. LoSA against its baselines at an equal fine-tuning budget (issue 4)
$PY bench/losa_bench.py --sparsity 0.5 --out bench/results/losa_wanda50.json
$PY bench/losa_bench.py --sparsity 0.7 --out bench/results/losa_wanda70.json
# 8. Self-Pruner: uniform / GA / local-LLM search at 20% and 40% (issue 6)
for r in 20 40; do
    $PY bench/selfpruner_bench.py --rate "0.$((r / 10))" --population 6 --generations 3 --children 3 --eval_windows 8 \
        --out "bench/results/selfpruner_$r.json"
done
# 9. DeepSparse speed (needs `make deepsparse-env`) and zero-shot of the 70% models (issue 5)
MODELS="wanda50" THREADS=2 bash bench/deepsparse_bench.sh
MODELS="wanda70 atp70" THREADS=1 bash bench/deepsparse_bench.sh
for m in wanda70 atp70; do
    .venv/bin/sparsellm --quiet eval zeroshot --model "bench/work/$m" --limit 100 --save "bench/results/zeroshot_limit100/$m"
done
# 10. where a prune's peak memory comes from (issue 2)
$PY bench/memory_probe.py --method wanda --sparsity 0.5 --nsamples 64 --seqlen 512 --out bench/results/memory_probe_wanda50.json
$PY bench/memory_parts.py --nsamples 128 --seqlen 2048 --blocks 2 --out bench/results/memory_parts_128x2048.json
$PY bench/memory_parts.py --nsamples 128 --seqlen 2048 --blocks 2 --batch_size 4 \
    --out bench/results/memory_parts_128x2048_b4.json
