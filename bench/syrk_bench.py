"""Is the symmetric rank-k update (BLAS ssyrk, one triangle) faster than the full `H += xᵀx` on this CPU, and
does it give the same XᵀX? (issue 21 part 2: LayerStats' Hessian.)

For each shape (tokens × C_in) of one micro-batch of a linear's inputs, three ways of accumulating
H += xᵀx into an fp32 (C_in, C_in) accumulator are timed, interleaved round after round so that load from
other work on the machine falls on all alike; the median per way and its ratio to the old one go to the JSON:
  matmul  h = x.t() @ x; H.add_(h)           (the old LayerStats.add: a temporary C_in² matrix)
  addmm   H.addmm_(x.t(), x)                 (in place, full matrix, torch's BLAS)
  syrk    scipy.linalg.blas.ssyrk, beta=1    (in place, one triangle, SciPy's OpenBLAS; symmetrized once)
  blocked H[j:, j:j+512].addmm_(x[:, j:]ᵀ, x[:, j:j+512])  (the lower triangle by block columns, torch's BLAS)
With --with_forward every update follows a linear's forward on x (torch's threads), as in the engine, where
the hooks run between the block's operators: another thread pool (SciPy's OpenBLAS) may then contend.
Also for the squared column norms Σ_t x[t, j]² (Wanda's statistic):
  mulsum (x * x).sum(0);  square x.square().sum(0);  vnorm linalg.vector_norm(x, dim=0).square();
  einsum einsum("tc,tc->c", x, x).
The error of each against a float64 XᵀX is recorded (max |diff| / max |XᵀX|).

    nice -n 10 python bench/syrk_bench.py --out bench/results/syrk_bench.json

Measured on a 2-core EPYC shared with other work: ratios within one process only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from scipy.linalg import blas

from sparsellm.provenance import versions


def _syrk(H, x):
    blas.ssyrk(1.0, x.numpy().T, beta=1.0, c=H.numpy().T, trans=0, lower=0, overwrite_c=1)


def _blocked(H, x, block=512):
    """The lower triangle by block columns with torch's BLAS: H[j:, j:j+b] += x[:, j:]ᵀ x[:, j:j+b]."""
    C = x.shape[1]
    for j in range(0, C, block):
        H[j:, j:j + block].addmm_(x[:, j:].t(), x[:, j:j + block])


HESSIAN = {
    "matmul": lambda H, x: H.add_(x.t() @ x),
    "addmm": lambda H, x: H.addmm_(x.t(), x),
    "syrk": _syrk,
    "blocked": _blocked,
}
NORMS = {
    "mulsum": lambda x: (x * x).sum(0),
    "square": lambda x: x.square().sum(0),
    "vnorm": lambda x: torch.linalg.vector_norm(x, dim=0).square(),
    "einsum": lambda x: torch.einsum("tc,tc->c", x, x),
}


def _time(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _reps(fn, seconds=0.25):
    """Repetitions of `fn` that take about `seconds` (after one warm-up call)."""
    fn()
    return max(3, int(seconds / max(_time(fn, 1), 1e-6)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x576,2048x1536,8192x4096", help="tokens x C_in, comma list")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--with_forward", action="store_true",
                    help="time each update after a (C_in, C_in) linear's forward on the same x (torch's threads)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"with_forward": args.with_forward, "versions": versions(), "threads": torch.get_num_threads(), "rounds": args.rounds, "shapes": {}}
    for shape in args.shapes.split(","):
        T, C = (int(v) for v in shape.split("x"))
        x = torch.randn(T, C)
        ref = (x.double().t() @ x.double())
        H = torch.zeros(C, C)
        Wf = torch.randn(C, C) / C ** 0.5
        err = {}
        for name, fn in HESSIAN.items():
            H.zero_()
            fn(H, x)
            full = H.tril() + H.tril(-1).t() if name in ("syrk", "blocked") else H
            err[name] = float((full.double() - ref).abs().max() / ref.abs().max())
        sq = ref.diagonal()
        for name, fn in NORMS.items():
            err[name] = float((fn(x).double() - sq).abs().max() / sq.abs().max())
        reps = {n: _reps(lambda: fn(H, x)) for n, fn in HESSIAN.items()}
        reps.update({n: _reps(lambda: fn(x)) for n, fn in NORMS.items()})
        times = {n: [] for n in [*HESSIAN, *NORMS]}
        for r in range(args.rounds):
            hs = list(HESSIAN)[r % 4:] + list(HESSIAN)[: r % 4]
            for name in hs:
                if args.with_forward:  # a linear's forward before each update, as in the engine's hooks
                    times[name].append(_time(lambda: (torch.nn.functional.linear(x, Wf), HESSIAN[name](H, x)),
                                             reps[name]))
                else:
                    times[name].append(_time(lambda: HESSIAN[name](H, x), reps[name]))
            ns = list(NORMS)[r % 4:] + list(NORMS)[: r % 4]
            for name in ns:
                times[name].append(_time(lambda: NORMS[name](x), reps[name]))
        med = {n: statistics.median(t) for n, t in times.items()}
        out["shapes"][shape] = {
            "median_s": med,
            "hessian_ratio_to_matmul": {n: med[n] / med["matmul"] for n in HESSIAN},
            "norm_ratio_to_mulsum": {n: med[n] / med["mulsum"] for n in NORMS},
            "rel_error": err, "reps": reps}
        print(shape, json.dumps(out["shapes"][shape], indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
