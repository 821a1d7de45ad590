"""What does the engine's micro-batch (calibration windows per block forward) cost in time, and what does it
save in peak memory? (issue 2's memory budget: model + 2 × calibration activations + 1 GiB.)

One process, one model, one set of calibration windows. For each block in `--blocks`, the two passes the
engine makes per block (Wanda's statistics pass with its hooks, then the replay) are timed at every micro-batch
size, the sizes *interleaved* round after round (A B C, B C A, ...) so that load from other work on the machine
falls on all of them alike; the median per size, and its ratio to the engine's default, go to the JSON.
Each measurement's transient memory (Linux VmHWM above the RSS just before it, peak reset in between) is
recorded too. Weights are not pruned: the passes cost the same on dense and sparse weights.

    python bench/microbatch_bench.py --nsamples 64 --seqlen 512 --batch_sizes 16,8,4,2 \
        --out bench/results/microbatch_64x512.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparsellm.provenance import versions
from sparsellm.data import calibration_windows
from sparsellm.engine import _gather_stats, auto_batch_size, capture_inputs, run_block
from sparsellm.models import block_linears, get_blocks, load_model

from memory_probe import status  # Linux VmRSS / VmHWM in MiB (bench/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch_sizes", default="16,8,4,2", help="windows per block forward, comma list")
    ap.add_argument("--blocks", default="0,15,29", help="decoder blocks to time")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sizes = list(dict.fromkeys(int(b) for b in args.batch_sizes.split(",")))
    if args.rounds < 1 or min(sizes) < 1:
        ap.error("--rounds and every batch size must be >= 1")
    default = min(auto_batch_size(args.seqlen), args.nsamples)  # what the engine would use
    model, tok, _ = load_model(args.model)
    idx = [int(k) for k in args.blocks.split(",")]
    if not all(0 <= k < len(get_blocks(model)) for k in idx):
        ap.error(f"--blocks must lie in 0..{len(get_blocks(model)) - 1}")
    ids = calibration_windows(tok, "c4", args.nsamples, args.seqlen, seed=0)
    X, kwargs = capture_inputs(model, ids)
    Y = torch.empty_like(X)
    blocks = get_blocks(model)
    times = {b: [] for b in sizes}
    transient = {b: [] for b in sizes}
    with torch.no_grad():
        for r in range(args.rounds):
            order = sizes[r % len(sizes):] + sizes[: r % len(sizes)]
            for bs in order:
                total = 0.0
                for i in idx:
                    block, lin = blocks[i], block_linears(model, blocks[i])
                    base = status("VmRSS")
                    Path("/proc/self/clear_refs").write_text("5")
                    t0 = time.perf_counter()
                    _gather_stats(block, lin, "norm", lambda: run_block(block, X, kwargs[i], Y, bs))
                    run_block(block, X, kwargs[i], Y, bs, compare=True)
                    total += time.perf_counter() - t0
                    transient[bs].append(status("VmHWM") - base)
                times[bs].append(total)
                print(f"round {r} batch {bs:3d}: {total:.2f}s", flush=True)
    ref = statistics.median(times[default]) if default in times else None
    res = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "blocks": args.blocks,
           "rounds": args.rounds, "default_batch_size": default, "threads": torch.get_num_threads(),
           "versions": versions(), "sizes": []}
    for bs in sizes:
        med = statistics.median(times[bs])
        res["sizes"].append({"batch_size": bs, "tokens_per_forward": bs * args.seqlen, "median_seconds": med,
                             "seconds": times[bs], "time_vs_default": med / ref if ref else None,
                             "max_transient_mib": max(transient[bs])})
        print(f"batch {bs:3d} ({bs * args.seqlen:5d} tokens): median {med:.2f}s"
              + (f", {med / ref:.2f}× the default's time" if ref else "")
              + f", transient ≤ {max(transient[bs]):.0f} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
