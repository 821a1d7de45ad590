#!/usr/bin/env bash
# The prepared GPU check (issue 19), under 8 minutes on one H200: see bench/gpu_check.py.
#   bash bench/gpu_check.sh              # writes $OUT/gpu_check.json ($OUT: the device tool's folder, else bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout 470 python bench/gpu_check.py --out "${OUT:-bench/results}/gpu_check.json" --budget 330 "$@"
