"""Pruning benchmark: sparsellm vs llmcompressor on identical jobs, written to bench/results/*.json.

Each pruning run is its own process (so peak RSS is per run): a spawned child that calls the library's
`sparsellm.runs.run_prune` (what `sparsellm prune ... --save DIR` runs) for us, `bench/llmc_prune.py` in its
own venv (make bench-env) for llmcompressor, fed the exact same calibration token windows, and then
`sparsellm eval ppl` on its saved model. Speed is reported as a ratio of the two pruning wall times
measured in the same benchmark run.

    python bench/prune_bench.py --jobs wanda:0.5,sparsegpt:0.5 --nsamples 64 --seqlen 512 \
        --eval_windows 16 --llmc --out bench/results/llmc_64x512.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLMC_PY = ROOT / "bench" / ".venv-llmc" / "bin" / "python"


def sh(cmd: list[str]) -> float:
    """Run a command, fail loudly, return its wall time in seconds."""
    t0 = time.perf_counter()
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _prune_child(model: str, method: str, flat: dict, max_windows, save: str) -> None:
    """In a fresh process: one library run, as `sparsellm --quiet prune ... --eval wikitext2 --eval_seqlen 2048
    --save DIR` would do it."""
    import logging

    from sparsellm.config import Evaluation, ModelSource, Output
    from sparsellm.pipeline import PruneConfig
    from sparsellm.runs import PruneRun, run_prune

    logging.basicConfig(level=logging.WARNING)
    cfg = PruneRun(ModelSource(model), PruneConfig.from_flat(prune_method=method, **flat),
                   Evaluation(eval="wikitext2", eval_seqlen=2048, max_windows=max_windows), Output(save=save))
    run_prune(cfg, progress=False)


def library_run(model: str, method: str, flat: dict, max_windows, save: Path) -> float:
    """Run `_prune_child` in a spawned process, fail loudly, return its wall time in seconds."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    print("+ run_prune", model, method, flat, f"max_windows={max_windows}", save, flush=True)
    proc = mp.get_context("spawn").Process(target=_prune_child, args=(model, method, flat, max_windows, str(save)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the pruning run failed (exit {proc.exitcode})")
    return time.perf_counter() - t0


def parse_job(job: str) -> tuple[str, list[str], str]:
    """"wanda:0.5" -> ("wanda", [--sparsity_ratio 0.5], "0:0"); "sparsegpt:2:4" -> (..., [--sparsity_type 2:4], "2:4")."""
    method, _, spec = job.partition(":")
    if ":" in spec:
        return method, ["--sparsity_type", spec], spec
    return method, ["--sparsity_ratio", spec], "0:0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--jobs", default="magnitude:0.5,wanda:0.5,sparsegpt:0.5",
                    help="comma-separated METHOD:RATIO or METHOD:N:M; empty for none")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_windows", type=int, default=16, help="WikiText-2 windows of 2048 (0 = all)")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--llmc", action="store_true", help="also run llmcompressor on each wanda/sparsegpt job")
    ap.add_argument("--diag_nsamples", type=int, default=None, help="sparsellm's diagnostic windows (default: "
                                                                     "the library's, 8)")
    ap.add_argument("--engines", default="block", help="comma-separated sparsellm engines to run each job with "
                                                        "(block, single)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from sparsellm.provenance import versions
    from sparsellm.data import calibration_windows
    from sparsellm.models import load_model

    model, tok, model_dir = load_model(args.model)
    hidden = model.config.hidden_size
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    act_mib = args.nsamples * args.seqlen * hidden * 4 / 2**20
    del model
    (ROOT / "bench" / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / "bench" / "work"))
    windows = ["--max_windows", str(args.eval_windows)] if args.eval_windows else []
    sparsellm = [sys.executable, "-m", "sparsellm", "--quiet"]
    results = {"model": args.model, "model_dir": str(model_dir), "nsamples": args.nsamples, "seqlen": args.seqlen,
               "seed": args.seed, "eval": f"wikitext2_ppl@2048, {args.eval_windows or 'all'} windows",
               "precision": "float32 forwards and pruning, float32 statistics",
               "memory_budget_mib": model_mib + 2 * act_mib + 1024, "model_mib": model_mib,
               "activations_mib": act_mib, "versions": versions(), "threads": torch.get_num_threads(),
               "command": shlex.join(sys.argv), "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    if args.dense:
        d = work / "dense"
        sh(sparsellm + ["eval", "ppl", "--model", args.model, "--seqlen", "2048", *windows, "--save", d])
        results["dense"] = json.loads((d / "report.json").read_text())["eval"]["wikitext2_ppl@2048"]
        save()

    calib_pt = work / "calib.pt"
    if args.llmc:
        torch.save(calibration_windows(tok, "c4", args.nsamples, args.seqlen, args.seed), calib_pt)

    for job in filter(None, args.jobs.split(",")):
        method, flags, mask_structure = parse_job(job)
        ours = []
        for engine in args.engines.split(","):
            d = work / f"ours-{engine}-{job.replace(':', '_')}"
            flat = {flags[0][2:]: float(flags[1]) if flags[0] == "--sparsity_ratio" else flags[1],
                    "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "engine": engine,
                    **({} if args.diag_nsamples is None else {"diag_nsamples": args.diag_nsamples})}
            wall = library_run(args.model, method, flat, args.eval_windows or None, d)
            rep = json.loads((d / "report.json").read_text())
            run = {"job": job, "tool": "sparsellm", "engine": engine,
                   "diag_nsamples": rep["prune"]["options"]["diag_nsamples"], "prune_seconds": rep["prune"]["prune_seconds"],
                   "process_seconds": wall, "peak_rss_mib": rep["prune"]["peak_rss_mib"],
                   "measured_sparsity": rep["prune"]["measured"]["sparsity"],
                   "batch_size": rep["prune"]["options"]["batch_size"],
                   "ppl": rep["eval"]["wikitext2_ppl@2048"]["ppl"],
                   "within_memory_budget": rep["prune"]["peak_rss_mib"] <= results["memory_budget_mib"]}
            results["runs"].append(run)
            ours.append(run)
            save()
        if args.llmc and method in ("wanda", "sparsegpt"):
            ld = work / f"llmc-{job.replace(':', '_')}"
            ratio = flags[1] if flags[0] == "--sparsity_ratio" else "0.5"
            wall = sh([LLMC_PY, "bench/llmc_prune.py", "--model_dir", model_dir, "--calib_pt", calib_pt,
                       "--method", method, "--sparsity", ratio, "--mask_structure", mask_structure,
                       "--out_dir", ld / "model", "--result_json", ld / "result.json"])
            lr = json.loads((ld / "result.json").read_text())
            sh(sparsellm + ["eval", "ppl", "--model", ld / "model", "--seqlen", "2048", *windows, "--save", ld])
            lppl = json.loads((ld / "report.json").read_text())["eval"]["wikitext2_ppl@2048"]["ppl"]
            shutil.rmtree(ld / "model")
            results["runs"].append({"job": job, "tool": "llmcompressor", "version": lr.get("version"),
                                    "prune_seconds": lr["oneshot_seconds"], "process_seconds": wall,
                                    "peak_rss_mib": lr["peak_rss_mib"],
                                    "measured_sparsity": lr["measured_sparsity"], "ppl": lppl})
            for run in ours:
                run["time_ratio_vs_llmc"] = run["prune_seconds"] / lr["oneshot_seconds"]
                run["ppl_vs_llmc"] = run["ppl"] - lppl
            save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
