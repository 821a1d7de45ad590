"""The GPU check (issue 19): a random LLaMA-2-7B-shaped model built on the device (nothing is downloaded),
pruned with the onloading engine (weights in CPU memory, one block at a time on the GPU) by Wanda and
SparseGPT at 50% and 2:4 from 128 × 2048 calibration windows, and perplexity throughput; peak GPU memory.

    bash bench/gpu_check.sh                      # on the device machine: PYTHONPATH=. and a time limit
    python bench/gpu_check.py --shape tiny --device cpu --nsamples 4 --seqlen 64 --out /tmp/gpu_check.json

The calibration and evaluation windows are random token ids: the model is random, and time depends only on
the number of tokens (a WikiText-2 test set is ~340k LLaMA tokens: `--eval_tokens`). Every job starts from
the same dense weights (kept in CPU memory). Jobs stop being started once `--budget` seconds have passed,
and the JSON is rewritten after every job, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

SHAPES = {"llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
          "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsellm.devices import describe, resolve_device, resolve_dtype
    from sparsellm.evaluate.perplexity import perplexity
    from sparsellm.onload import attach
    from sparsellm.pipeline import PruneConfig, prune
    from sparsellm.provenance import versions
    from sparsellm.runs.record import place_for_eval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="blocks of the model (default: the shape's; fewer "
                                                             "gives per-block times of a slow method sooner)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--jobs", default="wanda:0.5,wanda:0.5@single,sparsegpt:0.5,sparsegpt:0.5@single,wanda:2:4,"
                                     "sparsegpt:2:4", help="METHOD:RATIO or METHOD:N:M, @single for the single-pass engine")
    p.add_argument("--eval_tokens", type=int, default=340_000, help="tokens of the perplexity run (0: none)")
    p.add_argument("--eval_batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=400, help="start no job after this many seconds")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args()
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line per pruned block
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, "bfloat16")
    t_start = time.perf_counter()
    out = {"device": describe(device), "dtype": str(dtype), "shape": args.shape, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "versions": versions(), "jobs": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    def peak():
        return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    t0 = time.perf_counter()
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers is not None else {}))
    out["layers"] = shape["num_hidden_layers"]
    config = LlamaConfig(**shape, dtype=str(dtype).removeprefix("torch."))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # random init on the device
    dense = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    model.to("cpu")
    out["create_seconds"] = time.perf_counter() - t0
    attach(model, device)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=gen)
    save()
    for job in args.jobs.split(","):
        if time.perf_counter() - t_start > args.budget:
            out["jobs"].append({"job": job, "skipped": "time budget"})
            continue
        spec, _, engine = job.partition("@")
        method, _, pattern = spec.partition(":")
        settings = dict(prune_method=method, nsamples=args.nsamples, seqlen=args.seqlen, engine=engine or "block")
        settings.update(sparsity_type=pattern) if ":" in pattern else settings.update(sparsity_ratio=float(pattern))
        model.load_state_dict(dense)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        report = prune(model, None, PruneConfig.from_flat(**settings), calib_ids=calib, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["jobs"].append({"job": job, "prune_seconds": time.perf_counter() - t0,
                            "measured": report["measured"]["sparsity"], "peak_gpu_gib": peak(),
                            "last_cum_error": report["blocks"][-1]["cum_error"],
                            "block_seconds": [b["seconds"] for b in report["blocks"]]})
        print(json.dumps(out["jobs"][-1]), flush=True)
        save()
    if args.eval_tokens and time.perf_counter() - t_start <= args.budget:
        model.load_state_dict(dense)
        n = max(1, args.eval_tokens // args.seqlen)
        ids = torch.randint(0, config.vocab_size, (1, n * args.seqlen), generator=gen)
        placement = place_for_eval(model, device)  # moved whole when it fits, else block by block
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        ppl = perplexity(model, None, "wikitext2", args.seqlen, ids=ids, batch_size=args.eval_batch, progress=False)
        seconds = time.perf_counter() - t0
        out["perplexity"] = {"windows": n, "tokens": n * args.seqlen, "seconds": seconds, "ppl": ppl["ppl"],
                             "tokens_per_second": n * args.seqlen / seconds, "peak_gpu_gib": peak(),
                             "batch": args.eval_batch, "placement": placement}
        print(json.dumps(out["perplexity"]), flush=True)
    out["total_seconds"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    main()
