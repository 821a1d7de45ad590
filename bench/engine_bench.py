"""The block engine against the single-pass engine on one model shape, in one process: seconds and the rise of
peak RSS of `engine.prune_blocks`, engines and methods interleaved round after round so that load from other
work falls on all alike (the machine is shared).

With --model, a real model cut to its first --blocks blocks, on C4 windows. Otherwise the model is random-weight, built in memory with the shape's dimensions and only --blocks decoder blocks (a
LLaMA-2-7B block is 202M parameters: 0.8 GB in fp32), so this measures the per-block cost at that width without
the 13.8 GB checkpoint. The calibration windows are random token ids. Every run starts from the same weights.
The peak is VmHWM, reset before each run (writing 5 to /proc/self/clear_refs), minus the RSS just before it.

    python bench/engine_bench.py --shape llama2-7b --blocks 2 --nsamples 8 --seqlen 512 \
        --out bench/results/engines_7b_blocks.json
    python bench/engine_bench.py --model smollm2-135m --blocks 4 --nsamples 64 --seqlen 512 --diag_nsamples 8 \
        --out bench/results/engines_smollm2_4blocks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_random_checkpoint import SHAPES  # noqa: E402
from memory_probe import reset_peak, status  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    ap.add_argument("--model", default=None, help="a real model instead (e.g. smollm2-135m), cut to its first "
                                                   "--blocks blocks, with C4 calibration windows")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--engines", default="block,single")
    ap.add_argument("--diag_nsamples", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsellm.engine import prune_blocks
    from sparsellm.provenance import versions

    if args.model:
        from sparsellm.data import calibration_windows
        from sparsellm.models import get_blocks, load_model

        model, tok, _ = load_model(args.model)
        del get_blocks(model)[args.blocks:]
        model.config.num_hidden_layers = args.blocks
        shape = {"model": args.model, "num_hidden_layers": args.blocks}
        ids = calibration_windows(tok, "c4", args.nsamples, args.seqlen, seed=0)
    else:
        shape = dict(SHAPES[args.shape], num_hidden_layers=args.blocks, vocab_size=1024)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).eval()
        ids = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.rounds):
        for method in args.methods.split(","):
            for engine in args.engines.split(","):
                model.load_state_dict(dense)
                before = status("VmRSS")
                reset_peak()
                t0 = time.perf_counter()
                res = prune_blocks(model, ids, method, [0.5] * args.blocks, progress=False, engine=engine,
                                   diag_nsamples=args.diag_nsamples)
                seconds = time.perf_counter() - t0
                runs.append({"round": rnd, "method": method, "engine": engine, "seconds": seconds,
                             "seconds_per_block": seconds / args.blocks, "peak_rise_mib": status("VmHWM") - before,
                             "rel_error": [r["rel_error"] for r in res], "measured": [r["measured"] for r in res]})
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for method in args.methods.split(","):
        med = {e: statistics.median(r["seconds"] for r in runs if r["method"] == method and r["engine"] == e)
               for e in args.engines.split(",")}
        peak = {e: max(r["peak_rise_mib"] for r in runs if r["method"] == method and r["engine"] == e) for e in med}
        summary[method] = {"median_seconds": med, "peak_rise_mib": peak}
        if {"block", "single"} <= set(med):
            summary[method]["single_vs_block"] = med["single"] / med["block"]
    result = {"command": " ".join(sys.argv), "shape": shape, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "dtype": "float32", "threads": torch.get_num_threads(), "diag_nsamples": args.diag_nsamples,
              "versions": versions(), "runs": runs, "summary": summary}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
