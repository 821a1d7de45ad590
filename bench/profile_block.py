"""Where does one decoder block's time go when Wanda and SparseGPT prune it, before and after issue 21's
"less work per statistic" (a symmetric, one-triangle Hessian; SparseGPT's q/k/v and gate/up as one
stacked OBS)? One process, one model, one set of calibration windows, one block.

The block's inputs are the dense model's (blocks 0 .. b−1 run unpruned). For each method and each variant,
"old" (reconstructed here: the Hessian as `H += x.t() @ x`, norms as `(x * x).sum(0)`, every linear pruned
alone) and "new" (the library as it is), rounds alternate old/new (ABBA) so that load from other work on
the machine falls on both alike, and the block's weights are restored before every round:

  forward      the block's dense forward over the windows, no hooks (engine.run_block)
  statistics   the time inside LayerStats.add (the hooks), measured around every call
  prune        block_work.prune_linears: all the block's linears, wall time, not profiled
  replay       the pruned block's forward with the reconstruction error (run_block(compare=True))

and, in one extra profiled (torch.profiler) prune per variant, the prune phase split by operator:
  hessian      Hessian read (symmetrize), scaling, damping, Cholesky, inverse (SparseGPT)
  mask         score and selection: topk, sort, masked_fill, scatter, pow, abs, sqrt, comparisons
  update       OBS update: addr_, mm, the column stores and subtractions (SparseGPT)
  copies/other clone, copy_, to, cat, empty, zeros, sums/isfinite checks, everything else
(self CPU time of the operators, as shares; the profiler's own overhead inflates the many small ops of the
column loop, so the shares are indicative and the wall times above are the numbers).
The pruned weights of old and new are compared (equal masks and the largest difference; the two Hessians
differ by float32 rounding, so a few near-tie mask decisions may differ), and the new stacked SparseGPT
against the new statistics with every linear pruned alone (`stacked_equals_alone`: bitwise).

    nice -n 10 python bench/profile_block.py --nsamples 8 --seqlen 256 --out bench/results/profile_block_8x256.json
    nice -n 10 python bench/profile_block.py --nsamples 64 --seqlen 512 --out bench/results/profile_block_64x512.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from sparsellm import engine
from sparsellm.data import calibration_windows
from sparsellm.block_work import gather_stats as _gather_stats, prune_linears as _prune_linears, run_block
from sparsellm.engine import auto_batch_size, capture_inputs
from sparsellm.models import block_linears, get_blocks, load_model
from sparsellm.prune import LayerStats
from sparsellm.provenance import versions
from sparsellm.registry import get

ADD_SECONDS = [0.0]


class NewStats(LayerStats):
    def add(self, x, need):
        t0 = time.perf_counter()
        super().add(x, need)
        ADD_SECONDS[0] += time.perf_counter() - t0


class OldStats(LayerStats):
    """LayerStats.add as it was before issue 21 part 2 (commit 43e3ee8)."""

    def add(self, x, need):
        t0 = time.perf_counter()
        x = x.reshape(-1, x.shape[-1]).float()
        self.ntokens += x.shape[0]
        s = (x * x).sum(0)
        self.sq_norm = s if self.sq_norm is None else self.sq_norm.add_(s)
        if need == "hessian":
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        ADD_SECONDS[0] += time.perf_counter() - t0


CATEGORIES = {
    "hessian": ("cholesky", "linalg", "diag", "mean", "clamp", "isfinite", "all"),
    "mask": ("topk", "sort", "masked_fill", "scatter", "pow", "abs", "sqrt", "bitwise_or", "ior", "__or__",
             "index_put", "ne", "eq", "lt", "le", "gt"),
    "update": ("addr", "mm", "sub", "rsub", "div", "mul", "add", "select", "slice", "as_strided"),
}


def _category(op: str) -> str:
    name = op.removeprefix("aten::").rstrip("_")
    for cat, words in CATEGORIES.items():
        if any(name == w or name.startswith(w + "_") or (len(w) > 4 and w in name) for w in words):
            return cat
    return "copies/other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--block", type=int, default=15)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per variant (ABBA order)")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    blocks = get_blocks(model)
    ids = calibration_windows(tok, "c4", args.nsamples, args.seqlen, seed=0)
    bs = min(auto_batch_size(args.seqlen), args.nsamples)
    with torch.no_grad():
        X, kwargs = capture_inputs(model, ids)
        Y = torch.empty_like(X)
        for i in range(args.block):  # dense inputs of the profiled block
            run_block(blocks[i], X, kwargs[i], Y, bs)
            X, Y = Y, X
    block, kw = blocks[args.block], kwargs[args.block]
    linears = block_linears(model, block)
    saved = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    with torch.no_grad():  # the Hessians of the two accumulations, on one linear (q_proj's input)
        hs = []
        for cls in (OldStats, NewStats):
            engine.LayerStats = cls
            st = _gather_stats(block, linears, "hessian", lambda: run_block(block, X, kw, Y, bs))
            hs.append(next(iter(st.values())).hessian.double())
        engine.LayerStats = LayerStats
        hessian_rel_diff = float((hs[0] - hs[1]).abs().max() / hs[0].abs().max())
    res = {"model": args.model, "hessian_old_vs_new_max_rel_diff": hessian_rel_diff, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "block": args.block,
           "sparsity": args.sparsity, "batch_size": bs, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "versions": versions(), "machine": "2-core EPYC shared with other work: ratios within this process only",
           "methods": {}}

    def one(method, variant, profile=False):
        for n, lin in linears.items():
            lin.weight.data.copy_(saved[n])
        pruner = get("pruner", method)
        if variant in ("old", "new_alone"):  # new_alone: the new statistics, every linear pruned alone
            pruner = dataclasses.replace(pruner, group=None)
        engine.LayerStats = OldStats if variant == "old" else NewStats
        t = {}
        with torch.no_grad():
            t0 = time.perf_counter()
            run_block(block, X, kw, Y, bs)
            t["forward"] = time.perf_counter() - t0
            ADD_SECONDS[0] = 0.0
            t0 = time.perf_counter()
            stats = _gather_stats(block, linears, pruner.needs, lambda: run_block(block, X, kw, Y, bs))
            t["hooked_forward"] = time.perf_counter() - t0
            t["statistics"] = ADD_SECONDS[0]
            prof = None
            t0 = time.perf_counter()
            if profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    _prune_linears(model, args.block, linears, pruner, stats, args.sparsity, None, {})
            else:
                _prune_linears(model, args.block, linears, pruner, stats, args.sparsity, None, {})
            t["prune"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_block(block, X, kw, Y, bs, compare=True)
            t["replay"] = time.perf_counter() - t0
        engine.LayerStats = LayerStats
        weights = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        return t, weights, prof

    for method in args.methods.split(","):
        times = {"old": defaultdict(list), "new": defaultdict(list)}
        one(method, "new")  # warm-up
        for r in range(args.rounds):
            for variant in (("old", "new") if r % 2 == 0 else ("new", "old")):
                t, w, _ = one(method, variant)
                for k, v in t.items():
                    times[variant][k].append(v)
                print(f"{method} round {r} {variant}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True)
        out = {}
        weights = {}
        for variant in ("old", "new"):
            _, weights[variant], prof = one(method, variant, profile=True)
            by_cat = defaultdict(float)
            by_op = defaultdict(float)
            for e in prof.key_averages():
                by_op[e.key] += e.self_cpu_time_total / 1e6
                by_cat[_category(e.key)] += e.self_cpu_time_total / 1e6
            total = sum(by_cat.values())
            med = {k: statistics.median(v) for k, v in times[variant].items()}
            out[variant] = {"median_s": med, "seconds": dict(times[variant]),
                            "profiled_prune_self_cpu_s": dict(by_cat),
                            "profiled_prune_share": {k: v / total for k, v in by_cat.items()},
                            "top_ops_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])}
        out["new_over_old"] = {k: out["new"]["median_s"][k] / out["old"]["median_s"][k]
                               for k in out["new"]["median_s"]}
        _, weights["new_alone"], _ = one(method, "new_alone")
        out["stacked_equals_alone"] = all(torch.equal(weights["new"][n], weights["new_alone"][n]) for n in linears)
        out["same_masks"] = all(torch.equal(weights["old"][n] == 0, weights["new"][n] == 0) for n in linears)
        out["max_abs_diff"] = max(float((weights["old"][n] - weights["new"][n]).abs().max()) for n in linears)
        out["max_abs_weight"] = max(float(weights["old"][n].abs().max()) for n in linears)
        res["methods"][method] = out
        print(method, json.dumps({k: out[k] for k in ("new_over_old", "stacked_equals_alone", "same_masks",
                                                      "max_abs_diff")}), flush=True)
        for variant in ("old", "new"):
            print(f"  {variant} median", json.dumps({k: round(v, 4) for k, v in out[variant]["median_s"].items()}),
                  "profiled shares",
                  json.dumps({k: round(v, 3) for k, v in out[variant]["profiled_prune_share"].items()}))
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
