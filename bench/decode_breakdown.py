"""Where a batch-1 decode step's time goes: the linears (every nn.Linear or swapped sparse module, lm_head
included) against everything else (attention, norms, rotary, the KV cache, Python), for the dense fp32 model in
PyTorch and for pruned models through our kernels, in one process. The linears are timed with forward pre- and
post-hooks (perf_counter), so a step is measured twice: once plain (tok/s) and once hooked (the split; the hooks
add their own small cost, reported as `hook_overhead_ms`).

"Amdahl bound": the dense model's step time over the time outside its linears, the speedup a sparse model would
reach if its linears took no time at all.

    python bench/decode_breakdown.py --models /tmp/skb_full/wanda70 --threads 2 \
        --out bench/results/decode_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsellm.kernels import sparsify  # noqa: E402
from sparsellm.kernels.linear import SparseLinear  # noqa: E402
from sparsellm.models import load_model  # noqa: E402


def step_ms(model, steps: int, prompt: int = 32) -> float:
    """Median over `steps` single-token decode steps after a `prompt`-token prefill, in ms."""
    ids = torch.randint(0, min(1000, model.config.vocab_size), (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        pkv, nxt, times = out.past_key_values, ids[:, -1:], []
        for _ in range(steps + 2):
            t = time.perf_counter()
            pkv = model(nxt, past_key_values=pkv, use_cache=True).past_key_values
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


def split_ms(model, steps: int) -> tuple[float, float]:
    """(hooked step ms, of which ms inside the linears), medians over `steps` steps."""
    acc, start = [0.0], {}
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear))]

    def pre(mod, args):
        start[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        acc[0] += time.perf_counter() - start[id(mod)]

    hooks = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        ids = torch.randint(0, min(1000, model.config.vocab_size), (1, 32), generator=torch.Generator().manual_seed(0))
        totals, linears = [], []
        with torch.no_grad():
            out = model(ids, use_cache=True)
            pkv, nxt = out.past_key_values, ids[:, -1:]
            for _ in range(steps + 2):
                acc[0] = 0.0
                t = time.perf_counter()
                pkv = model(nxt, past_key_values=pkv, use_cache=True).past_key_values
                totals.append(time.perf_counter() - t)
                linears.append(acc[0])
    finally:
        for h in hooks:
            h.remove()
    return statistics.median(totals[2:]) * 1e3, statistics.median(linears[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m", help="the dense model (a preset, directory or hub id)")
    ap.add_argument("--models", default="", help="comma list of pruned model directories, run through our kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians are reported")
    ap.add_argument("--out", default="bench/results/decode_breakdown.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"dense fp32": load_model(args.dense, dtype=torch.float32)[0].eval()}
    for d in filter(None, args.models.split(",")):
        m = load_model(d, dtype=torch.float32)[0].eval()
        sparsify(m)
        models[Path(d).name + " kernels"] = m
    res = {name: {"step_ms": [], "hooked_ms": [], "linears_ms": []} for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():  # alternate
            res[name]["step_ms"].append(step_ms(m, args.steps))
            hooked, lin = split_ms(m, args.steps)
            res[name]["hooked_ms"].append(hooked)
            res[name]["linears_ms"].append(lin)
    rows = {}
    for name, r in res.items():
        step, hooked, lin = (statistics.median(r[k]) for k in ("step_ms", "hooked_ms", "linears_ms"))
        rows[name] = {"step_ms": step, "tok_s": 1e3 / step, "linears_ms": lin, "other_ms": hooked - lin,
                      "hook_overhead_ms": hooked - step, "linears_share": lin / hooked, "raw": r}
        print(f"{name}: {step:.1f} ms/token ({1e3 / step:.1f} tok/s); hooked {hooked:.1f} ms = linears {lin:.1f} "
              f"+ other {hooked - lin:.1f}", flush=True)
    dense = rows["dense fp32"]
    out = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats, "rows": rows,
           "amdahl_bound": dense["step_ms"] / (dense["step_ms"] - dense["linears_ms"]),
           "speedups": {n: dense["step_ms"] / r["step_ms"] for n, r in rows.items()}, "torch": torch.__version__}
    print(f"Amdahl bound (dense step / time outside its linears): {out['amdahl_bound']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
