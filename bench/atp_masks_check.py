"""ATP's β search with mask trials (`--atp_trials masks`, issue 21): does the cheap proxy choose the same β as
the exhaustive sweep of full sequential prunes recorded in BENCHMARKS.md §5, and what does the search cost
against one prune measured in this process?

For every recorded setting (bench/results/layerwise_*.json rows with an ATP search) it scores every β of the
recorded grid with masks from one dense pass (`allocate.search.MaskDatabase`: Wanda's masks, also for
SparseGPT), on the recorded objective (C4 validation, 4 windows of 2048), with the §5 calibration (32 C4
windows of 512, seed 0). It reports the proxy's β, the recorded β, the golden search's β and trial count on
the proxy's table, and seconds: the dense pass, each trial, and one real prune of each method (uniform rates,
block engine, no diagnostic) timed here.

    python bench/atp_masks_check.py --out bench/results/atp_masks_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = [  # (method, sparsity, recorded file)
    ("wanda", 0.5, "layerwise_wanda50.json"), ("wanda", 0.6, "layerwise_wanda60.json"),
    ("wanda", 0.7, "layerwise_wanda70.json"), ("wanda", 0.7, "layerwise_wanda70_step002.json"),
    ("sparsegpt", 0.5, "layerwise_sparsegpt50.json"), ("sparsegpt", 0.6, "layerwise_sparsegpt60.json"),
    ("sparsegpt", 0.7, "layerwise_sparsegpt70_part2.json"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from sparsellm.allocate import atp
    from sparsellm.allocate.atp_search import fibonacci_search
    from sparsellm.allocate.search import MaskDatabase
    from sparsellm.data import calibration_windows, eval_tokens
    from sparsellm.engine import prune_blocks
    from sparsellm.evaluate import perplexity
    from sparsellm.models import get_blocks, load_model
    from sparsellm.provenance import versions

    torch.set_num_threads(2)
    model, tok, _ = load_model(args.model, torch.float32)
    L = len(get_blocks(model))
    calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0)
    t0 = time.perf_counter()
    db = MaskDatabase(model, calib, "wanda", progress=False)
    dense_pass = time.perf_counter() - t0
    prune_s = {}
    for method in ("wanda", "sparsegpt"):  # one real prune of each, uniform 50%, in this process
        t0 = time.perf_counter()
        prune_blocks(model, calib, method, [0.5] * L, progress=False)
        prune_s[method] = time.perf_counter() - t0
        db.restore()
        print(f"one {method} prune: {prune_s[method]:.1f} s; dense pass {dense_pass:.1f} s", flush=True)
    objective = {}  # (seqlen, windows) -> ids
    cache: dict = {}
    rows = []
    for method, sparsity, name in SETTINGS:
        rec = next(r for r in json.loads((ROOT / "bench/results" / name).read_text())["runs"] if "trials" in r)
        o = rec["objective"]
        ids = objective.setdefault(o["seqlen"], eval_tokens(tok, o["dataset"], o["seqlen"]))
        betas = [t["beta"] for t in rec["trials"]]
        table = []
        for beta in betas:
            key = (sparsity, round(beta, 10), o["windows"], o["seqlen"])
            if key not in cache:
                t0 = time.perf_counter()
                db.apply(atp.allocate(L, sparsity, atp_beta=beta))
                r = perplexity(model, tok, o["dataset"], o["seqlen"], o["windows"], progress=False, ids=ids)
                cache[key] = (r["ppl"], time.perf_counter() - t0)
                db.restore()
            table.append(cache[key])
        objs = [t[0] for t in table]
        proxy = min(range(len(betas)), key=lambda i: (objs[i], i))
        golden, order = fibonacci_search(lambda i: objs[i], len(betas))
        trial_s = sum(t[1] for t in table) / len(table)
        search_s = dense_pass + sum(table[i][1] for i in order)
        row = {"method": method, "sparsity": sparsity, "recorded": name, "step": rec.get("atp_step"),
               "betas": betas, "proxy_objective": objs, "recorded_objective": [t["objective"] for t in rec["trials"]],
               "recorded_beta": rec["best_beta"], "proxy_beta": betas[proxy], "golden_beta": betas[golden],
               "golden_trials": len(order), "grid_size": len(betas), "same_beta": betas[golden] == rec["best_beta"],
               "trial_seconds_mean": trial_s, "golden_search_seconds": search_s,
               "one_prune_seconds": prune_s[method], "ratio_golden_search_to_one_prune": search_s / prune_s[method],
               "recorded_ratio_sweep_to_one_prune": rec["search_seconds"] / rec["one_prune_seconds"]}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "sparsity", "recorded_beta", "proxy_beta", "golden_beta",
                                              "golden_trials", "ratio_golden_search_to_one_prune")}), flush=True)
    out = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "dense_pass_seconds": dense_pass,
           "one_prune_seconds": prune_s, "rows": rows, "versions": versions()}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
