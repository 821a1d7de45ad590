"""One decode-shaped multiply (x: (1, in) fp32) per weight shape: dense fp32 F.linear against our compiled
kernel (bitmap format, values in each dtype of `--values`, default fp16) at `--sparsity` (random mask), at 1 and
2 threads, median of `--repeats` alternating timings of `--calls` calls each. SmolLM2-135M's 576-wide linears
fit in L2 (so dense F.linear reads them from cache here, unlike in a whole model's decode) and take ~10-100 us;
the 7B shapes read their bytes from L3 or memory.

    python bench/kernel_shapes_micro.py --out bench/results/kernel_shapes_micro.json
    python bench/kernel_shapes_micro.py --values float16,int8 --out bench/results/kernel_shapes_micro_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsellm.kernels import BitmapWeight, build

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]


def per_call_us(f, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--values", default="float16", help="comma list of float16, bfloat16, float32, int8")
    ap.add_argument("--out", default="bench/results/kernel_shapes_micro.json")
    args = ap.parse_args()
    ext = build.load()
    if ext is None:
        raise SystemExit("the compiled kernels are unavailable here")
    torch.manual_seed(0)
    rows = []
    for out, n_in in SHAPES:
        w = torch.randn(out, n_in)
        w[torch.rand(out, n_in) < args.sparsity] = 0
        packed = {v: BitmapWeight.pack(w, getattr(torch, v)) for v in args.values.split(",")}
        x = torch.randn(1, n_in)
        calls = max(20, args.calls * 576 * 576 // (out * n_in))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fs = {"dense_fp32_us": lambda: F.linear(x, w)}
            for v, bw in packed.items():
                fs[f"kernel_{v}_us"] = (lambda bw=bw, threads=threads:
                                        ext.spmm_expand(bw.row_ptr, bw.bits, bw.values, x, threads, bw.scales))
            times = {k: [] for k in fs}
            for k, f in fs.items():
                per_call_us(f, max(5, calls // 10))  # warm-up
            for _ in range(args.repeats):
                for k, f in fs.items():
                    times[k].append(per_call_us(f, calls))
            row = {"shape": [out, n_in], "threads": threads, **{k: statistics.median(v) for k, v in times.items()}}
            for v in packed:
                row[f"speedup_{v}"] = row["dense_fp32_us"] / row[f"kernel_{v}_us"]
            rows.append(row)
            print(f"{out}x{n_in} t{threads}: dense fp32 {row['dense_fp32_us']:.1f} us, " + ", ".join(
                f"{v} {row[f'kernel_{v}_us']:.1f} us {row[f'speedup_{v}']:.2f}x" for v in packed), flush=True)
    res = {"sparsity": args.sparsity, "values": args.values.split(","), "isa": ext.isa(), "repeats": args.repeats, "rows": rows,
           "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
