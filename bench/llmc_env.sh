#!/usr/bin/env bash
# Create bench/.venv-llmc: an isolated venv with the llmcompressor baseline
# (vllm-project/llm-compressor) used by the benchmark for side-by-side timing.
#
# torch is installed FIRST and pinned (torch==2.13.0, the local CPU wheel) and
# then passed as a constraint, so resolving llmcompressor can never pull a
# multi-GB CUDA torch. llmcompressor 0.14.0.1 requires torch>=2.10,<=2.14 and
# transformers>=5.15,<=5.17, so it works with torch 2.13.0 as is.
# Idempotent: does nothing if the venv already imports llmcompressor.
# Usage: bash bench/llmc_env.sh      (override with PYTHON=..., LLMC_VERSION=...)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llmc"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import torch, llmcompressor, sys; \
sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    echo "llmc venv OK: $VENV"
    exit 0
fi

[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install "torch==$TORCH_VERSION"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"$PY" -m pip install -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION"

"$PY" -c "import torch, transformers, llmcompressor; \
print('llmcompressor', llmcompressor.__version__, '| torch', torch.__version__, \
'| transformers', transformers.__version__)"
