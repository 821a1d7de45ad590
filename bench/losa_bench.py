"""LoSA benchmark (issue 4): no fine-tuning, LoRA + merge, static masked LoRA and LoSA on the same
fine-tuning data (the same number of tokens), on SmolLM2-135M. One `sparsellm finetune` process per method,
so each peak RSS is that method's own. Writes one JSON per setting with perplexity, measured sparsity
after the merge, fine-tuning tokens, wall time and peak memory, plus LoSA's per-step log.

    python bench/losa_bench.py --sparsity 0.5 --out bench/results/losa_wanda50.json
    python bench/losa_bench.py --table bench/results/losa_wanda*.json      # markdown for BENCHMARKS.md
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
METHODS = ["none", "lora", "masked-lora", "losa"]


def run(args, method: str, work: Path) -> dict:
    out = work / method
    cmd = [str(ROOT / ".venv/bin/sparsellm"), "--quiet", "finetune", "--model", args.model, "--method", method,
           "--sparsity_ratio", str(args.sparsity), "--prune_method", args.prune_method,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--data", "c4",
           "--ft_nsamples", str(args.ft_nsamples), "--ft_seqlen", str(args.ft_seqlen),
           "--ft_batch_size", str(args.ft_batch_size), "--grad_accum", str(args.grad_accum), "--lr", str(args.lr),
           "--step_eval_windows", str(args.step_eval_windows), "--eval", "wikitext2", "--eval_seqlen", "2048",
           "--max_windows", str(args.eval_windows), "--out", str(out)]
    if method == "losa":  # LoSA's own settings (another method refuses them; it never read them)
        cmd[-2:-2] = ["--rmi_nsamples", str(args.nsamples), "--rank_nsamples", str(args.rank_nsamples),
                      "--steps", str(args.steps)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    ft = rep["finetune"]
    tokens = sum((s.get("train") or {}).get("tokens", 0) for s in ft["steps"]) + (ft.get("train") or {}).get("tokens", 0)
    train_s = sum((s.get("train") or {}).get("seconds", 0) for s in ft["steps"]) + (ft.get("train") or {}).get("seconds", 0)
    ppl = rep["eval"]["wikitext2_ppl@2048"]
    steps = [{k: s.get(k) for k in ("step", "target", "measured", "mean_rank", "ranks", "rates", "prune_seconds",
                                    "rmi_seconds")} | {"ppl": (s.get("ppl") or {}).get("ppl"),
                                                       "loss": (s.get("train") or {}).get("losses")}
             for s in ft["steps"]]
    return {"method": method, "wikitext2_ppl": ppl["ppl"], "windows": ppl["windows"],
            "measured_sparsity": ft["measured"]["sparsity"], "ft_tokens": tokens, "ft_train_seconds": train_s,
            "finetune_seconds": ft["seconds"], "wall_seconds": wall, "peak_rss_mib": rep["peak_rss_mib"],
            "train_losses": (ft.get("train") or {}).get("losses"), "ranks": ft.get("ranks"), "steps": steps,
            "command": shlex.join(cmd[1:])}


def table(paths) -> str:
    lines = ["| S | method | wikitext2 ppl | measured sparsity | FT tokens | train s | total s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for p in paths:
        res = json.loads(Path(p).read_text())
        for r in res["runs"]:
            lines.append(f"| {res['settings']['sparsity']} | {r['method']} | {r['wikitext2_ppl']:.3f} "
                         f"| {r['measured_sparsity']:.4f} | {r['ft_tokens']:,} | {r['ft_train_seconds']:.0f} "
                         f"| {r['finetune_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prune_method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rank_nsamples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ft_nsamples", type=int, default=40)
    ap.add_argument("--ft_seqlen", type=int, default=256)
    ap.add_argument("--ft_batch_size", type=int, default=4)
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--step_eval_windows", type=int, default=2)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", nargs="*", default=None, help="print the markdown table of these result files")
    args = ap.parse_args()
    if args.table is not None:
        print(table(args.table))
        return
    if args.out is None:
        ap.error("--out is required")
    runs = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        for m in args.methods.split(","):
            runs.append(run(args, m, Path(work)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("steps", "command")}), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    Path(args.out).write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    print(table([args.out]))


if __name__ == "__main__":
    sys.exit(main())
