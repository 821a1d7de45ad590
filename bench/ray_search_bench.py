"""Self-Pruner's fitness on a Ray cluster (issue 22 part 6): the same GA search of layer-wise structured rates
on SmolLM2-135M, serially and on a local Ray cluster with 1 and 2 workers, in one process: the importance
once, then each search from the same seed. Writes the wall times (cluster start with the actors' model load,
and the search itself) and whether each Ray search's state (population, fitness values, evaluations,
history best / mean) equals the serial one exactly.

    python bench/ray_search_bench.py --out bench/results/ray_search.json            # the real run
    python bench/ray_search_bench.py --smoke --out bench/results/ray_search_smoke.json  # proves it works (~minutes)

Threads: the serial search uses torch's default (all cores); a worker uses max(1, cores // workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = dict(population=2, generations=1, children=1, nsamples=2, seqlen=64, fitness_windows=1, fitness_seqlen=64)


def same_state(a: dict, b: dict) -> bool:
    hist = lambda s: [(h["best"], h["mean"], h["evals"]) for h in s["history"]]  # noqa: E731
    return (a["population"] == b["population"] and a["cache"] == b["cache"] and a["evals"] == b["evals"]
            and hist(a) == hist(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--max_rate", type=float, default=0.8)
    ap.add_argument("--metric", default="wanda-sp")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--children", type=int, default=4, help="crossover and mutation children per generation, each")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--fitness_windows", type=int, default=2)
    ap.add_argument("--fitness_seqlen", type=int, default=512)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts after the serial run")
    ap.add_argument("--smoke", action="store_true", help=f"a tiny search that only proves the script works: {SMOKE}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    import torch

    from sparsellm.data import calibration_windows
    from sparsellm.evaluate.perplexity import eval_tokens
    from sparsellm.models import context_length, get_blocks, load_model
    from sparsellm.selfpruner import GAOperators, SearchConfig, evolve
    from sparsellm.selfpruner.driver import fitness_of
    from sparsellm.selfpruner.parallel import Cluster
    from sparsellm.structured import importance

    model, tok, _ = load_model(args.model, torch.float32)
    seqlen = min(args.fitness_seqlen, context_length(model))
    t0 = time.perf_counter()
    calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0)
    imp = importance(model, calib, args.metric, progress=False)
    imp_s = time.perf_counter() - t0
    ids = eval_tokens(tok, "c4", seqlen)[:, :args.fitness_windows * seqlen]
    cfg = SearchConfig(target_rate=args.rate, max_rate=args.max_rate, population=args.population,
                       generations=args.generations, crossover=args.children, mutation=args.children, seed=0)
    L = len(get_blocks(model))

    def serial(rates):
        return fitness_of(model, imp, rates, ids, seqlen, args.fitness_windows, "query")

    runs = []
    t0 = time.perf_counter()
    ref = evolve(serial, L, cfg, GAOperators())
    runs.append({"workers": 0, "threads": torch.get_num_threads(), "start_s": 0.0,
                 "search_s": time.perf_counter() - t0, "evals": ref["evals"], "identical": True})
    print(f"serial: {runs[-1]['search_s']:.1f} s, {ref['evals']} evaluations", flush=True)
    for n in (int(w) for w in args.workers.split(",") if w):
        t0 = time.perf_counter()
        with Cluster(workers=n) as cluster:
            many = cluster.fitness(model, imp, ids, seqlen, args.fitness_windows, "query")
            t1 = time.perf_counter()
            state = evolve(serial, L, cfg, GAOperators(), fitness_many=many)
            t2 = time.perf_counter()
        runs.append({"workers": n, "threads": cluster.threads, "start_s": t1 - t0, "search_s": t2 - t1,
                     "evals": state["evals"], "identical": same_state(state, ref)})
        print(f"{n} workers: start {t1 - t0:.1f} s, search {t2 - t1:.1f} s, identical {runs[-1]['identical']}",
              flush=True)
    result = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "blocks": L, "importance_s": imp_s, "best_fitness": ref["population"][0]["fitness"],
              "best_rates": ref["population"][0]["rates"], "runs": runs,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": __import__("ray").__version__, "load_avg": os.getloadavg()}}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all(r["identical"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
