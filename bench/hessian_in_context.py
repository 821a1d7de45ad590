"""How fast is the Hessian accumulation inside the engine's hooks (LayerStats.add, issue 21 part 2), where
the block's own operators run between the updates? Isolated timings (bench/syrk_bench.py) missed that SciPy's
OpenBLAS thread pool contends with torch's there.

SmolLM2-135M's block `--block` runs on the dense model's inputs to it; `_gather_stats` ("hessian") over the
windows is repeated with each way of doing H += xᵀx, the ways interleaved round after round (rotated), and
the time inside the updates (`add`, norms included) and of the whole hooked forward are recorded (medians):
  matmul        H.add_(x.t() @ x)                       (before issue 21)
  addmm         H.addmm_(x.t(), x)
  syrk          scipy.linalg.blas.ssyrk, lower triangle (SciPy's OpenBLAS threads)
  syrk_1thread  the same under threadpoolctl.threadpool_limits(1, "blas") (when threadpoolctl is installed)
  blocked256    H[j:, j:j+256].addmm_(x[:, j:]ᵀ, x[:, j:j+256]) (the library's `add_gram_`), and blocked512

    nice -n 10 python bench/hessian_in_context.py --nsamples 8 --seqlen 256 --out bench/results/hessian_in_context_8x256.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from scipy.linalg.blas import ssyrk

from sparsellm import engine
from sparsellm.data import calibration_windows
from sparsellm.engine import _gather_stats, auto_batch_size, capture_inputs, run_block
from sparsellm.models import block_linears, get_blocks, load_model
from sparsellm.prune import LayerStats, add_gram_
from sparsellm.provenance import versions

SECONDS = [0.0]


def _syrk(H, x):
    ssyrk(1.0, x.numpy().T, beta=1.0, c=H.numpy().T, trans=0, lower=0, overwrite_c=1)


def _syrk1(H, x):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        _syrk(H, x)


WAYS = {"matmul": lambda H, x: H.add_(x.t() @ x), "addmm": lambda H, x: H.addmm_(x.t(), x), "syrk": _syrk,
        "syrk_1thread": _syrk1, "blocked256": lambda H, x: add_gram_(H, x, 256),
        "blocked512": lambda H, x: add_gram_(H, x, 512)}


def _stats_class(update):
    class Timed(LayerStats):
        def add(self, x, need):
            t0 = time.perf_counter()
            x = x.reshape(-1, x.shape[-1]).float()
            self.ntokens += x.shape[0]
            s = x.square().sum(0)
            self.sq_norm = s if self.sq_norm is None else self.sq_norm.add_(s)
            if self._hessian is None:
                self._hessian = torch.zeros(x.shape[1], x.shape[1])
            update(self._hessian, x)
            SECONDS[0] += time.perf_counter() - t0
    return Timed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--block", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ways = dict(WAYS)
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        del ways["syrk_1thread"]
    model, tok, _ = load_model(args.model)
    ids = calibration_windows(tok, "c4", args.nsamples, args.seqlen, seed=0)
    bs = min(auto_batch_size(args.seqlen), args.nsamples)
    blocks = get_blocks(model)
    with torch.no_grad():
        X, kwargs = capture_inputs(model, ids)
        Y = torch.empty_like(X)
        for i in range(args.block):
            run_block(blocks[i], X, kwargs[i], Y, bs)
            X, Y = Y, X
    block, kw, linears = blocks[args.block], kwargs[args.block], block_linears(model, blocks[args.block])
    upd, total = {n: [] for n in ways}, {n: [] for n in ways}
    with torch.no_grad():
        for r in range(args.rounds):
            names = list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]
            for n in names:
                engine.LayerStats = _stats_class(ways[n])
                SECONDS[0] = 0.0
                t0 = time.perf_counter()
                _gather_stats(block, linears, "hessian", lambda: run_block(block, X, kw, Y, bs))
                total[n].append(time.perf_counter() - t0)
                upd[n].append(SECONDS[0])
    engine.LayerStats = LayerStats
    med = {n: statistics.median(v) for n, v in upd.items()}
    medt = {n: statistics.median(v) for n, v in total.items()}
    res = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "block": args.block,
           "batch_size": bs, "rounds": args.rounds, "threads": torch.get_num_threads(), "versions": versions(),
           "machine": "2-core EPYC shared with other work: ratios within this process only",
           "update_median_s": med, "update_ratio_to_matmul": {n: v / med["matmul"] for n, v in med.items()},
           "hooked_forward_median_s": medt,
           "hooked_forward_ratio_to_matmul": {n: v / medt["matmul"] for n, v in medt.items()},
           "update_s": upd, "hooked_forward_s": total}
    for n in ways:
        print(f"{n:13s} updates {med[n]:.3f}s ({med[n] / med['matmul']:.2f}×)  hooked forward {medt[n]:.3f}s "
              f"({medt[n] / medt['matmul']:.2f}×)")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
