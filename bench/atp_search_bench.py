"""ATP β search cost (issue 21): one `sparsellm allocate --search` run, in this process, on SmolLM2-135M with the
BENCHMARKS.md §5 setting (32 C4 windows × 512 tokens of calibration, seed 0; objective: C4-validation perplexity
on 4 windows of 2048; WikiText-2 on the first 16 windows of 2048), and the search's seconds against one prune's,
both from the same run's report:

    python bench/atp_search_bench.py --method wanda --sparsity 0.7 --atp_step 0.002 --atp_search golden \
        --out bench/results/atp_search_wanda70.json

"one prune" is given two ways: the first trial's prune (no reconstruction-error diagnostic, as in every trial)
and the run's final prune with the chosen β (`prune.prune_seconds`, with the default diagnostic on 8 windows).
--compare FILE adds the exhaustive search recorded in a layerwise_bench result file (same setting) for the β
it chose and its objective table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--atp_step", type=float, default=0.002)
    ap.add_argument("--atp_search", default="golden", choices=("golden", "grid"))
    ap.add_argument("--atp_trials", default="prune", choices=("prune", "masks"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--objective_windows", type=int, default=4)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--compare", help="a layerwise_bench result file whose ATP row is the same setting")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from sparsellm.cli import main as cli
    from sparsellm.provenance import versions

    with tempfile.TemporaryDirectory() as work:
        argv = ["--quiet", "allocate", "--model", args.model, "--prune_method", args.method, "--sparsity_ratio",
                str(args.sparsity), "--allocation", "atp", "--nsamples", str(args.nsamples), "--seqlen",
                str(args.seqlen), "--eval", "wikitext2", "--eval_seqlen", "2048", "--max_windows",
                str(args.eval_windows), "--search", "--atp_step", str(args.atp_step), "--atp_search", args.atp_search, "--atp_trials", args.atp_trials,
                "--objective", "c4", "--objective_windows", str(args.objective_windows), "--save", f"{work}/DIR"]
        t0 = time.perf_counter()
        if cli(argv) != 0:
            sys.exit("the allocate run failed")
        wall = time.perf_counter() - t0
        rep = json.loads(Path(work, "DIR", "report.json").read_text())
    s, p = rep["search"], rep["prune"]
    ev = next(iter(rep["eval"].values()))
    out = {"command": "sparsellm " + " ".join(argv).replace(f"{work}/", ""), "model": args.model,
           "method": args.method, "sparsity": args.sparsity, "atp_step": args.atp_step, "strategy": s["strategy"],
           "grid_size": s["grid_size"], "best_beta": s["best_beta"], "beta_max": s["beta_max"],
           "trials": [{k: t[k] for k in ("beta", "objective", "prune_seconds", "seconds", "order")} for t in s["trials"]],
           "atp_trials": args.atp_trials, "setup_seconds": s.get("setup_seconds"),
           "search_seconds": s["search_seconds"], "first_trial_prune_seconds": s["one_prune_seconds"],
           "final_prune_seconds": p["prune_seconds"],
           "ratio_search_to_first_trial_prune": s["search_seconds"] / s["one_prune_seconds"]
           if s["one_prune_seconds"] else None,
           "ratio_search_to_final_prune": s["search_seconds"] / p["prune_seconds"],
           "wikitext2_ppl": ev["ppl"], "wikitext2_windows": ev["windows"], "wall_seconds": wall,
           "batch_size": p["options"]["batch_size"], "versions": versions()}
    if args.compare:
        row = next(r for r in json.loads(Path(args.compare).read_text())["runs"] if r["allocation"] == "atp")
        out["exhaustive"] = {"file": args.compare, "best_beta": row["best_beta"], "trials": len(row["trials"]),
                             "search_seconds": row["search_seconds"], "one_prune_seconds": row["one_prune_seconds"],
                             "wikitext2_ppl": row["ppl"],
                             "objectives": {f"{t['beta']:.4f}": t["objective"] for t in row["trials"]}}
        out["same_beta_as_exhaustive"] = abs(out["best_beta"] - row["best_beta"]) < 1e-12
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("trials", "versions", "exhaustive")}, indent=2))


if __name__ == "__main__":
    main()
