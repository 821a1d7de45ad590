"""Replay ATP's β search strategies offline on the recorded exhaustive searches (issue 21).

Every ATP row of bench/results/layerwise_*.json holds its search's per-β objectives (C4-validation
perplexity on 4 windows of 2048, one trial per grid point). This runs `fibonacci_search` (the default
`--atp_search golden`) on each of those tables, scoring a β by looking its recorded objective up, and
writes, for each recorded search: the exhaustive β, the golden search's β, the trials it used of the
grid's, whether the table is unimodal in fibonacci_search's sense (strictly down to the first minimum,
never down after it), and the seconds its trials took in the recorded run against the whole sweep's and
against the recorded run's first prune (`one_prune_seconds`). Those seconds are the recorded runs' own, on
a machine often shared with other work (BENCHMARKS.md §5): a replayed cost, not a new timing.

    python bench/atp_search_replay.py                       # -> bench/results/atp_search_replay.json

The recorded trials hold (β, objective, seconds) only, not per-block reconstruction errors, so an early
stop on the cumulative error cannot be checked on them (`per_trial_block_errors` in the output).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unimodal(values: list[float]) -> bool:
    """Strictly down to the first lowest value, never down after it."""
    m = min(range(len(values)), key=lambda i: (values[i], i))
    return all(a > b for a, b in zip(values[:m], values[1:m + 1])) and all(
        a <= b for a, b in zip(values[m:], values[m + 1:]))


def replay(path: str, row: dict, method: str, sparsity: float) -> dict:
    from sparsellm.allocate.atp_search import fibonacci_search

    trials = sorted(row["trials"], key=lambda t: t["beta"])
    betas, objs = [t["beta"] for t in trials], [t["objective"] for t in trials]
    steps = {round(b - a, 9) for a, b in zip(betas, betas[1:])}
    if len(steps) > 1 or betas[0] != 0.0:
        raise SystemExit(f"{path}: the recorded βs are not one grid from 0: {betas}")
    best, order = fibonacci_search(lambda i: objs[i], len(objs))
    exhaustive = min(range(len(objs)), key=lambda i: (objs[i], betas[i]))
    if abs(betas[exhaustive] - row["best_beta"]) > 1e-12:
        raise SystemExit(f"{path}: the table's argmin {betas[exhaustive]} is not the recorded β {row['best_beta']}")
    secs = [t["seconds"] for t in trials]
    return {"file": Path(path).name, "method": method, "sparsity": sparsity, "step": steps.pop() if steps else None,
            "grid_size": len(betas), "unimodal": unimodal(objs),
            "objectives": {f"{b:.4f}": o for b, o in zip(betas, objs)},
            "exhaustive_beta": betas[exhaustive], "golden_beta": betas[best], "same_beta": best == exhaustive,
            "golden_trials": len(order), "golden_order": [betas[i] for i in order],
            "recorded_sweep_trial_seconds": sum(secs), "golden_trial_seconds_recorded": sum(secs[i] for i in order),
            "recorded_search_seconds": row["search_seconds"], "recorded_one_prune_seconds": row["one_prune_seconds"],
            "sweep_trial_seconds_over_one_prune": sum(secs) / row["one_prune_seconds"],
            "golden_trial_seconds_over_one_prune": sum(secs[i] for i in order) / row["one_prune_seconds"],
            "per_trial_block_errors": any("blocks" in t or "cum_error" in t for t in row["trials"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="default: bench/results/layerwise_*.json")
    ap.add_argument("--out", default=str(ROOT / "bench/results/atp_search_replay.json"))
    args = ap.parse_args()
    rows = []
    for path in args.files or sorted(glob.glob(str(ROOT / "bench/results/layerwise_*.json"))):
        res = json.loads(Path(path).read_text())
        if not isinstance(res, dict) or "runs" not in res:
            continue  # a check's report.json, not a layerwise_bench result file
        rows += [replay(path, r, res["method"], res["sparsity"]) for r in res["runs"] if r.get("trials")]
    out = {"strategy": "golden (fibonacci_search)", "searches": rows,
           "all_same_beta": all(r["same_beta"] for r in rows)}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| setting | step | grid | unimodal | exhaustive β | golden β | golden trials | their recorded s | sweep s | "
          "one prune s | golden ÷ prune | sweep ÷ prune |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} {r['sparsity']:.0%} | {r['step']} | {r['grid_size']} | {'yes' if r['unimodal'] else 'no'} | "
              f"{r['exhaustive_beta']:.3f} | {r['golden_beta']:.3f} | {r['golden_trials']} | "
              f"{r['golden_trial_seconds_recorded']:.0f} | {r['recorded_sweep_trial_seconds']:.0f} | "
              f"{r['recorded_one_prune_seconds']:.0f} | {r['golden_trial_seconds_over_one_prune']:.1f} | "
              f"{r['sweep_trial_seconds_over_one_prune']:.1f} |")


if __name__ == "__main__":
    main()
