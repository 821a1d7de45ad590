#!/usr/bin/env bash
# The prepared GPU session (issues 19, 21, 24): one device call of under 8 minutes on one H200.
#   1. bench/semi24_bench.py --parts model: a random LLaMA-2-7B-shaped model pruned 2:4, prefill and decode
#      tokens/s, dense bf16 against PyTorch's cuSPARSELt 2:4 kernels (its CUTLASS ones need compute capability
#      8.x), first replayed from CUDA graphs (static KV cache), then eager;
#   2. the CUDA tests (the ones that skip on a CPU machine);
#   3. bench/gpu_check.py: Wanda 50% with the single-pass engine on all 32 blocks, then SparseGPT 50% with
#      both engines on 4 blocks (per-block times), 128 x 2048 calibration, the model in CPU memory and one
#      block at a time on the GPU (BENCHMARKS.md §9).
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
timeout -k 10 150 python bench/semi24_bench.py --parts model --backends cusparselt --modes graphs,eager \
    --prefill 128,512,2048 --decode_batches 1,8 --graph_new_tokens 64 --new_tokens 4 --repeats 5 \
    --out "$O/semi24_7b_model_graphs.json" 2>&1 | grep -v Warning | grep -v "return cls"; echo "semi24 model rc=${PIPESTATUS[0]} at $((SECONDS-t0)) s"
timeout -s INT -k 10 110 python -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py tests/test_prune_cuda.py \
    tests/test_eval_scale.py tests/test_gpu_finetune_search.py tests/test_zeroshot_offload.py tests/test_sparse_kernels.py \
    -k "not test_sparse_kernels or semi24" 2>&1 | tee "$O/pytest_cuda.log" | tail -30; echo "pytest rc=${PIPESTATUS[0]} at $((SECONDS-t0)) s"
timeout -s INT -k 10 85 python bench/gpu_check.py --out "$O/gpu_check_single.json" --budget 30 --eval_tokens 0 \
    --jobs wanda:0.5@single 2>&1 | tee "$O/gpu_check_single.log" | tail -3; echo "gpu_check single rc=${PIPESTATUS[0]} at $((SECONDS-t0)) s"
timeout -s INT -k 10 100 python bench/gpu_check.py --out "$O/gpu_check_sparsegpt.json" --layers 4 --budget 60 \
    --eval_tokens 0 --jobs sparsegpt:0.5,sparsegpt:0.5@single 2>&1 | tee "$O/gpu_check_sparsegpt.log" | tail -12
echo "gpu_check sparsegpt rc=${PIPESTATUS[0]} at $((SECONDS-t0)) s"
