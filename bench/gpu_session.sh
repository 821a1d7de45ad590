#!/usr/bin/env bash
# The prepared GPU session (issues 19, 21, 24): one device call of under 10 minutes on one H200.
#   1. bench/semi24_bench.py --parts model: a random LLaMA-2-7B-shaped model pruned 2:4, prefill and decode
#      tokens/s, dense bf16 against PyTorch's cuSPARSELt 2:4 kernels (its CUTLASS ones need compute capability 8.x);
#   2. the CUDA tests (the ones that skip on a CPU machine);
#   3. bench/semi24_bench.py --parts micro: one multiply per 7B linear shape, eager and CUDA-graph timings;
#   4. bench/gpu_check.py: Wanda and SparseGPT at 50%, both engines, 128 x 2048 calibration, the model in CPU
#      memory and one block at a time on the GPU (BENCHMARKS.md §9).
# Each step has its own time limit and writes under $OUT (the device tool's folder; else bench/results).
# The device image lacks greenlet (a dependency of the single-pass engine): carry its wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl greenlet==3.5.6
# and give the device call carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
O="${OUT:-bench/results}"
mkdir -p "$O"
if ! python -c "import greenlet" 2>/dev/null && ls .whl/greenlet-*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/greenlet-*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), 'cusparselt', torch.backends.cusparselt.is_available())"
t0=$SECONDS
timeout -k 10 160 python bench/semi24_bench.py --parts model --backends cusparselt --out "$O/semi24_7b_model.json"; echo "semi24 model rc=$? at $((SECONDS-t0)) s"
timeout -s INT -k 10 120 python -m pytest -q -p no:cacheprovider -rs tests/test_prune_cuda.py tests/test_eval_scale.py \
    tests/test_gpu_finetune_search.py tests/test_zeroshot_offload.py tests/test_sparse_kernels.py \
    -k "not test_sparse_kernels or semi24" 2>&1 | tee "$O/pytest_cuda.log" | tail -40; echo "pytest rc=${PIPESTATUS[0]} at $((SECONDS-t0)) s"
timeout -k 10 70 python bench/semi24_bench.py --parts micro --out "$O/semi24_7b_micro.json" > /dev/null; echo "semi24 micro rc=$? at $((SECONDS-t0)) s"
timeout -s INT -k 10 190 python bench/gpu_check.py --out "$O/gpu_check.json" --budget 100 --eval_tokens 0 \
    --jobs "${GPU_CHECK_JOBS:-wanda:0.5@single,sparsegpt:0.5,sparsegpt:0.5@single}"; echo "gpu_check rc=$? at $((SECONDS-t0)) s"
