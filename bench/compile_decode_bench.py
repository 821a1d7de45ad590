"""Batch-1 decode with and without torch.compile: the dense fp32 model in PyTorch against pruned models through
our kernels (SparseLinear is a custom op, so a swapped model compiles in one graph), in one process.

Each model generates greedily with transformers' static KV cache (fixed shapes, so the compiled decode step is
compiled once): decode ms per token = (time for `--long` new tokens − time for `--short`) / (long − short), so
the prefill cancels out. Eager first, then `model.forward = torch.compile(model.forward, dynamic=False)`
(inductor, compile time reported separately), then alternating repeats of every model and mode; medians.

    python bench/compile_decode_bench.py --models /tmp/skb_full/wanda70 --threads 2 \
        --out bench/results/compile_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsellm.kernels import sparsify  # noqa: E402
from sparsellm.models import load_model  # noqa: E402


def gen_s(model, ids, n: int) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        return time.perf_counter() - t


def decode_ms(model, ids, short: int, long: int) -> float:
    return (gen_s(model, ids, long) - gen_s(model, ids, short)) / (long - short) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--models", default="", help="comma list of pruned model directories, run through our kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/compile_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # every model shares LlamaForCausalLM.forward's code object, and each needs 4 graphs (prefill and decode at
    # two static-cache lengths): dynamo's default limit of 8 would leave a third model silently eager
    torch._dynamo.config.recompile_limit = 64
    specs = {"dense fp32": (args.dense, False)}
    for d in filter(None, args.models.split(",")):
        name = Path(d).name + " kernels"
        specs[name if name not in specs else d + " kernels"] = (d, True)

    def load(spec, sparse):
        m = load_model(spec, torch.float32)[0].eval()
        if sparse:
            sparsify(m)
        return m

    runs, compile_s = {}, {}
    for name, (spec, sparse) in specs.items():
        m = load(spec, sparse)
        if name == "dense fp32":
            vocab = m.config.vocab_size
            ids = torch.randint(0, min(1000, vocab), (1, args.prompt), generator=torch.Generator().manual_seed(0))
        gen_s(m, ids, args.short)  # warm-up
        runs[f"{name} eager"] = lambda m=m: decode_ms(m, ids, args.short, args.long)
    for name, (spec, sparse) in specs.items():  # a second copy of each model, compiled
        m = load(spec, sparse)
        m.forward = torch.compile(m.forward, dynamic=False)
        t = time.perf_counter()
        gen_s(m, ids, args.short)
        gen_s(m, ids, args.long)
        compile_s[name] = time.perf_counter() - t
        print(f"{name}: compiled (and warmed up) in {compile_s[name]:.1f} s", flush=True)
        runs[f"{name} compiled"] = lambda m=m: decode_ms(m, ids, args.short, args.long)
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():  # alternate
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["dense fp32 eager"]
    for k, v in med.items():
        print(f"{k}: {v:.1f} ms/token ({1e3 / v:.1f} tok/s), {base / v:.2f}x dense fp32 eager", flush=True)
    res = {"threads": args.threads, "prompt": args.prompt, "short": args.short, "long": args.long,
           "repeats": args.repeats, "decode_ms": times, "median_ms": med,
           "vs_dense_eager": {k: base / v for k, v in med.items()},
           "vs_dense_compiled": {k: med["dense fp32 compiled"] / v for k, v in med.items()},
           "compile_s": compile_s, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
