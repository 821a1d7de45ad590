"""Self-Pruner benchmark (issue 6; issue 22 adds `evopress`): uniform Wanda-sp, the GA search, the EvoPress-style
search and the LLM-driven search (`local`
backend, the bundled SmolLM2-135M-Instruct as the search LLM) at the same mean structured rate and the same
search settings (population, generations, children: the same evaluation budget), on SmolLM2-135M.
One `sparsellm search` process per run. Writes one JSON per rate with WikiText-2 perplexity of the best
vector, parameters, prefill / decode speed-up against dense (same process), search wall time, fitness
evaluations and the LLM's fallback count.

    python bench/selfpruner_bench.py --rate 0.2 --out bench/results/selfpruner_20.json
    python bench/selfpruner_bench.py --table bench/results/selfpruner_*.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, backend: str, work: Path) -> dict:
    out = work / backend
    cmd = [str(ROOT / ".venv/bin/sparsellm"), "--quiet", "search", "--model", args.model, "--backend", backend,
           "--target_rate", str(args.rate), "--max_rate", str(args.max_rate), "--metric", args.metric,
           "--population", str(args.population), "--generations", str(args.generations),
           "--crossover", str(args.children), "--mutation", str(args.children),
           *(["--llm_retries", str(args.llm_retries)] if backend in ("llm", "openai", "local") else []),  # theirs only
           *(shlex.split(args.evo_args) if backend == "evopress" else []),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--fitness_windows", str(args.fitness_windows),
           "--fitness_seqlen", str(args.fitness_seqlen), "--final_k", "1", "--eval", "wikitext2", "--eval_seqlen", "2048",
           "--max_windows", str(args.eval_windows), "--bench", "--out", str(out)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    run_ = json.loads((out / "report.json").read_text())
    s = run_["search"]
    return {"backend": backend, "wikitext2_ppl": run_["eval"]["wikitext2_ppl@2048"]["ppl"],
            "windows": run_["eval"]["wikitext2_ppl@2048"]["windows"], "best_fitness": s["best_fitness"],
            "params_dense": s["params_dense"], "params_pruned": s["params_pruned"], "best_rates": s["best_rates"],
            "evals": s["evals"], "proposed": s.get("proposed"), "new_candidates": s.get("new_candidates"),
            "search_seconds": s["search_seconds"], "importance_seconds": s["importance_seconds"],
            "operators": s["operators"], "speed_ratios": run_["speed"]["ratios"]["model fp32"],
            "speed": run_["speed"]["results"], "history": s["history"], "wall_seconds": wall,
            "peak_rss_mib": run_["peak_rss_mib"], "command": shlex.join(cmd[1:])}


def table(paths) -> str:
    lines = ["| mean rate | backend | wikitext2 ppl | params (of dense) | prefill@128 | prefill@512 | decode b1 "
             "| evals | search s | LLM calls / fallbacks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        res = json.loads(Path(p).read_text())
        for r in res["runs"]:
            sp = r["speed_ratios"]
            ops = r["operators"]
            llm = f"{ops['calls']} / {sum(ops['fallbacks'].values())}" if "calls" in ops else "—"
            lines.append(f"| {res['settings']['rate']} | {r['backend']} | {r['wikitext2_ppl']:.3f} "
                         f"| {r['params_pruned'] / 1e6:.1f}M ({r['params_pruned'] / r['params_dense']:.3f}) "
                         f"| {sp['prefill@128']:.2f}× | {sp['prefill@512']:.2f}× | {sp['decode_b1']:.2f}× "
                         f"| {r['evals']:g} | {r['search_seconds']:.0f} | {llm} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--max_rate", type=float, default=0.8)
    ap.add_argument("--metric", default="wanda-sp")
    ap.add_argument("--backends", default="uniform,ga,local")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--children", type=int, default=4, help="crossover and mutation children per generation, each")
    ap.add_argument("--llm_retries", type=int, default=0)
    ap.add_argument("--evo_args", default="--evo_offspring 8 --evo_survivors 2,1 --evo_windows 1,2",
                    help="the evopress backend's flags (its budget is the GA's: population + generations × 2 × children)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--fitness_windows", type=int, default=2)
    ap.add_argument("--fitness_seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", nargs="*", default=None)
    args = ap.parse_args()
    if args.table is not None:
        print(table(args.table))
        return
    if args.out is None:
        ap.error("--out is required")
    runs = []
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        for b in args.backends.split(","):
            runs.append(run(args, b, Path(work)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("history", "speed", "command")}), flush=True)
            tmp = Path(args.out).with_suffix(".tmp")  # after every backend: a run cut short keeps the finished ones
            tmp.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
            tmp.replace(args.out)
    print(table([args.out]))


if __name__ == "__main__":
    sys.exit(main())
