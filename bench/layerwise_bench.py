"""Layer-wise sparsity benchmark (issues 3 and 23): uniform, OWL, ATP (best β from its search), RMI, DLP,
AlphaPruning, LSA and ATP+DLP (β and α from their joint search, within ATP's trial budget) under the same
pruner, sparsity and calibration, on SmolLM2-135M. One `sparsellm allocate` process per run; the
results (rates, β chosen, allocation and search time, prune time, ppl, per-block local and cumulative
errors) go to one JSON file per setting, plus one figure of the cumulative error curves.

    python bench/layerwise_bench.py --method wanda --sparsity 0.7 --out bench/results/layerwise_wanda70.json
    python bench/layerwise_bench.py --method wanda --sparsity 0.7 --allocations atp --append --out ...  # add or redo rows
    python bench/layerwise_bench.py --method wanda --sparsity 0.7 --allocations dlp,alphapruning,lsa,atp_dlp --append --out ...
    python bench/layerwise_bench.py --method wanda --sparsity 0.7 --full_eval --out ...  # every row on all 148 windows
    python bench/layerwise_bench.py --table bench/results/layerwise_*.json     # markdown for BENCHMARKS.md

--full_eval re-prunes each row of --out with the rates that row recorded (`--allocation file:rates.json`, so ATP's
β is the one its search chose; the search never sees the test text) and adds its perplexity on all WikiText-2
windows to the row as `ppl_all`, with `ppl_all_first`: the re-pruned model on the row's own first windows,
which shows what the re-prune alone changed, and `window_nll_all`. It re-prunes with the row's own micro-batch
(`batch_size`) where the row recorded one: SparseGPT's masks (and, rarely, Wanda's) move with the micro-batch
through float rounding. A row with per-linear rates (`layer_rates`, e.g. `--alpha_mapping layer_wise`) cannot be
re-pruned from a block rates file and is refused.

Each row records `allocation_seconds` (the allocator's own pre-pass: OWL's, RMI's, DLP's and LSA's dense pass,
AlphaPruning's spectra) and, for ATP and ATP+DLP, `search_seconds`; the table's "allocation s" is their sum.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALLOCATIONS = ["uniform", "owl", "atp", "rmi", "dlp", "alphapruning", "lsa", "atp_dlp"]  # also: search (not in the default set)
SEARCHED = ("atp", "atp_dlp")  # run with `allocate --search`


def allocate_cmd(args, allocation: str, save: Path, batch_size: int | None = None) -> list[str]:
    """The `sparsellm allocate` command line shared by every run: prune, then WikiText-2 at 2048."""
    return [str(ROOT / ".venv/bin/sparsellm"), "--quiet", "allocate", "--model", args.model,
            "--prune_method", args.method, "--sparsity_ratio", str(args.sparsity), "--allocation", allocation,
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "wikitext2",
            "--eval_seqlen", "2048", "--save", str(save)] + (["--batch_size", str(batch_size)] if batch_size else [])


def recorded(cmd: list[str], names: dict[Path, str]) -> str:
    """The command line as stored in a row: no executable path, each temporary path replaced by its name."""
    def swap(arg: str) -> str:
        for path, name in names.items():
            arg = arg.replace(str(path), name)
        return arg
    return shlex.join(swap(a) for a in cmd[1:])  # swap before quoting, so odd characters in paths do not matter


def run(args, allocation: str, work: Path) -> dict:
    save = work / allocation
    if allocation.startswith("search"):  # search (EvoPress loop) or search-ga: `--allocation search`
        cmd = allocate_cmd(args, "search", save, args.batch_size) + [
            "--search_loop", allocation.partition("-")[2] or "evopress", "--search_budget", str(args.search_budget)]
    else:
        cmd = allocate_cmd(args, allocation, save, args.batch_size)
    if args.eval_windows:
        cmd += ["--max_windows", str(args.eval_windows)]
    if allocation in SEARCHED:
        cmd += ["--search", "--atp_step", str(args.atp_step), "--objective", "c4",
                "--objective_windows", str(args.objective_windows)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rep = json.loads((save / "report.json").read_text())
    ev = next(iter(rep["eval"].values()))
    out = {"allocation": allocation, "command": recorded(cmd, {save: "DIR"}), "wall_seconds": wall,
           "ppl": ev["ppl"], "metric": ev["metric"], "windows": ev["windows"],
           "rates": rep["allocation"]["rates"], "allocation_seconds": rep["allocation"]["seconds"],
           "prune_seconds": rep["prune"]["prune_seconds"], "peak_rss_mib": rep["peak_rss_mib"],
           "batch_size": rep["prune"]["options"]["batch_size"],
           "measured_sparsity": rep["prune"]["measured"]["sparsity"],
           "blocks": [{k: b[k] for k in ("block", "target", "measured", "rel_error", "cum_error")}
                      for b in rep["prune"]["blocks"]]}
    if "search" in rep:
        s = rep["search"]
        out.update(atp_step=args.atp_step, objective_windows=args.objective_windows,
                   best_beta=s["best_beta"], beta_max=s["beta_max"], search_seconds=s["search_seconds"],
                   one_prune_seconds=s["one_prune_seconds"], objective=s["objective"],
                   trials=[{k: t[k] for k in ("beta", "alpha", "objective", "seconds") if k in t} for t in s["trials"]])
        if "best_alpha" in s:
            out.update(best_alpha=s["best_alpha"], trial_budget=s["budget"])
    if "layer_rates" in rep["allocation"]:
        out["layer_rates"] = rep["allocation"]["layer_rates"]
    if "search_loop" in rep["allocation"]:
        a = rep["allocation"]
        out.update({k: a[k] for k in ("search_loop", "search_budget", "search_lambda", "evals", "generations",
                                      "uniform_fitness", "best_fitness", "fitness", "database_seconds",
                                      "search_seconds")})
    if "outlier_ratio" in rep["allocation"]:
        out["outlier_ratio"] = rep["allocation"]["outlier_ratio"]
    return out


def full_eval(args, row: dict, work: Path) -> dict:
    if "layer_rates" in row:
        sys.exit(f"--full_eval: {row['allocation']} has per-linear rates; a block rates file cannot re-prune it")
    save, rates = work / f"{row['allocation']}_all", work / f"{row['allocation']}_rates.json"
    rates.write_text(json.dumps(row["rates"]))
    # the row's own micro-batch where it recorded one, so that SparseGPT re-prunes the row's masks
    cmd = allocate_cmd(args, f"file:{rates}", save, args.batch_size or row.get("batch_size"))
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    rep = json.loads((save / "report.json").read_text())
    ev = next(iter(rep["eval"].values()))
    if rep["allocation"]["rates"] != row["rates"]:
        sys.exit(f"--full_eval: {row['allocation']} was pruned with other rates than its row")
    first = ev["window_nll"][:row["windows"]]  # the re-pruned model on the row's own first windows
    if len(first) != row["windows"]:
        sys.exit(f"--full_eval: {row['allocation']} scored {len(first)} windows, fewer than its row's {row['windows']}")
    return {"ppl_all": ev["ppl"], "windows_all": ev["windows"], "tokens_all": ev.get("tokens"),
            "ppl_all_first": math.exp(sum(first) / len(first)), "window_nll_all": ev["window_nll"],
            "batch_size_all": rep["prune"]["options"]["batch_size"],
            "measured_sparsity_all": rep["prune"]["measured"]["sparsity"],
            "command_all": recorded(cmd, {save: "DIR", rates: "RATES.json"}),
            "wall_seconds_all": time.perf_counter() - t0}


def full_eval_rows(res: dict, allocations: str | None, out: Path) -> list[str]:
    """The rows --full_eval re-prunes: those asked for, in that order and once each, or every row of the file."""
    rows = [r["allocation"] for r in res["runs"]]
    wanted = list(dict.fromkeys(allocations.split(","))) if allocations else rows
    if missing := [a for a in wanted if a not in rows]:
        sys.exit(f"--full_eval: {out} has no row for {', '.join(missing)} (it has {', '.join(rows)})")
    return wanted


def save(res: dict, out: Path) -> None:
    """Write the result file atomically: a failed write never leaves a truncated file behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)


def table(files: list[str]) -> str:
    lines = ["| pruner | sparsity | allocation | WikiText-2 ppl | windows | ppl, all windows | β chosen | "
             "allocation s | prune s |", "|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        try:
            res = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"--table: cannot read {f}: {e}")
        if not isinstance(res, dict) or "runs" not in res:  # e.g. a check's report.json matched by a glob of bench/results/layerwise_*.json
            print(f"--table: skipping {f}, not a layerwise_bench result file", file=sys.stderr)
            continue
        for r in res["runs"]:
            alloc_s = r["search_seconds"] + r["allocation_seconds"] if "best_beta" in r else r["allocation_seconds"]
            full = f"{r['ppl_all']:.2f} ({r['windows_all']})" if "ppl_all" in r else ""
            if "ppl_all_first" in r:
                full += f"; re-prune, first {r['windows']}: {r['ppl_all_first']:.2f}"
            beta = f"{r['best_beta']:.3f} (of ≤ {r['beta_max']:.4f})" if "best_beta" in r else ""
            if "best_alpha" in r:
                beta += f", α {r['best_alpha']:.3f}"
            lines.append(f"| {res['method']} | {res['sparsity']:.0%} | {r['allocation']} | {r['ppl']:.2f} | "
                         f"{r['windows']} | {full} | {beta} | {alloc_s:.1f} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--allocations", help=f"comma-separated (default: {','.join(ALLOCATIONS)}; with --full_eval, "
                    "every row of --out)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=16, help="WikiText-2 windows of 2048 (0 = all 148)")
    ap.add_argument("--atp_step", type=float, default=0.004)
    ap.add_argument("--objective_windows", type=int, default=4)
    ap.add_argument("--batch_size", type=int, help="calibration windows per block forward (default: sparsellm's, "
                    "about 2048 tokens; with --full_eval, the row's own if it recorded one). SparseGPT's masks (rarely "
                    "Wanda's) move with it through float rounding")
    ap.add_argument("--out")
    ap.add_argument("--search_budget", type=int, default=60,
                    help="fitness evaluations of the search rows (search, search-ga: --allocation search)")
    ap.add_argument("--append", action="store_true",
                    help="add these allocations to an existing --out of the same setting (a rerun replaces its row)")
    ap.add_argument("--full_eval", action="store_true",
                    help="re-prune the rows of --out with their recorded rates and add ppl on all windows")
    ap.add_argument("--table", nargs="*", help="print the markdown table of these result files and exit")
    args = ap.parse_args()
    if args.table is not None:
        print(table(args.table))
        return
    from sparsellm import plots
    from sparsellm.provenance import versions

    if not args.out:
        ap.error("--out is required (except with --table)")
    out = Path(args.out)
    res = {"method": args.method, "sparsity": args.sparsity, "model": args.model, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "eval_windows": args.eval_windows, "versions": versions(), "runs": []}
    if args.full_eval:
        if args.append:
            sys.exit("--full_eval adds columns to the rows of --out; --append adds rows: use one at a time")
        res = json.loads(out.read_text())
        if (res["method"], res["sparsity"], res["model"]) != (args.method, args.sparsity, args.model):
            sys.exit(f"--full_eval: {out} holds {res['method']} {res['sparsity']} on {res['model']}")
        args.nsamples, args.seqlen = res["nsamples"], res["seqlen"]  # the row's own calibration
        with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
            rows = {r["allocation"]: r for r in res["runs"]}
            for allocation in full_eval_rows(res, args.allocations, out):
                rows[allocation].update(full_eval(args, rows[allocation], Path(work)))
                save(res, out)  # after every run
        print(table([str(out)]))
        return
    if args.append and out.exists():
        old = json.loads(out.read_text())
        keys = [k for k in ("method", "sparsity", "model", "nsamples", "seqlen", "eval_windows")
                if k in old or k != "eval_windows"]  # older files did not record eval_windows
        if any(old.get(k) != res[k] for k in keys):
            sys.exit(f"--append: {out} holds another setting ({ {k: old.get(k) for k in keys} })")
        res["runs"] = [{**r, "versions": r.get("versions", old.get("versions"))} for r in old["runs"]]
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        for allocation in (args.allocations or ",".join(ALLOCATIONS)).split(","):
            new = {**run(args, allocation, Path(work)), "versions": res["versions"]}
            i = next((i for i, r in enumerate(res["runs"]) if r["allocation"] == allocation), len(res["runs"]))
            res["runs"][i:i + 1] = [new]  # a rerun replaces its row in place, only once it has succeeded
            save(res, out)  # after every run
    plots.error_curves({r["allocation"]: [{**b, "rel_error": None} for b in r["blocks"]] for r in res["runs"]},
                       out.with_suffix(".png"),
                       title=f"{args.method} {args.sparsity:.0%}: cumulative relative error per block")
    print(table([str(out)]))


if __name__ == "__main__":
    main()
