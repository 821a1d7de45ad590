"""A model larger than memory, pruned on this CPU: peak RSS, wall time, and a vanilla-transformers check of
the result (issue 19's benchmark).

    python bench/make_random_checkpoint.py --shape llama2-7b --out /work/big/llama7b-rand
    python bench/lazy_bench.py --model /work/big/llama7b-rand --jobs wanda:0.5,sparsegpt:0.5 \
        --nsamples 8 --seqlen 512 --workdir /work/big --out bench/results/lazy_7b.json

Each job runs `sparsellm prune --load lazy` in a child process; its peak RSS is the child's own
(`os.wait4`'s ru_maxrss), its wall time the child's. With --verify, the result is then loaded by plain
`AutoModelForCausalLM.from_pretrained` (in the checkpoint's dtype): the fraction of exact zeros of every
block linear, and the logits of one prompt against the lazy pipeline's own (`evaluate.blockwise_logits`,
same dtype). The output is deleted after each job unless --keep (two 7B outputs do not fit next to the input).
With --compare_memory (a model that fits), the same job also runs with --load memory and the weights of the
two outputs are compared tensor by tensor, and their perplexities, with the time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_job(args, method: str, rate: float, load: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sparsellm", "prune", "--model", args.model, "--load", load,
           "--prune_method", method, "--sparsity_ratio", str(rate), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--diag_nsamples", str(args.diag_nsamples), "--eval", args.eval,
           "--save_dtype", args.save_dtype, "--out", str(out), "--overwrite", "--quiet"]
    if args.max_windows:
        cmd += ["--max_windows", str(args.max_windows)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {os.waitstatus_to_exitcode(status)}")
    record = json.loads((out / "report.json").read_text())
    return {"method": method, "sparsity": rate, "load": load, "command": " ".join(cmd[2:]), "wall_seconds": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024, "prune_seconds": record["timings"].get("prune"),
            "measured": record["prune"]["measured"] if "prune" in record else None,
            "eval": {k: v["ppl"] for k, v in (record.get("eval") or {}).items()}, "out_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def verify(out: Path, prompt: str) -> dict:
    """Vanilla load of `out`: zeros of the block linears, and logits against the lazy pipeline's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsellm.evaluate.blockwise import blockwise_logits
    from sparsellm.models import block_linears, get_blocks
    from sparsellm.models.sharded import lazy_model

    dtype = getattr(torch, json.loads((out / "config.json").read_text())["dtype"])
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    lazy = lazy_model(out, dtype)
    mine = blockwise_logits(lazy, ids)
    lazy_seconds = time.perf_counter() - t0
    del lazy
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    load_seconds = time.perf_counter() - t0
    zeros = total = 0
    for block in get_blocks(model):
        for lin in block_linears(model, block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    with torch.no_grad():
        theirs = model(ids).logits.float()
    return {"dtype": str(dtype), "vanilla_load_seconds": load_seconds, "zeros": zeros, "params": total,
            "sparsity": zeros / total, "prompt_tokens": int(ids.shape[1]), "lazy_logits_seconds": lazy_seconds,
            "logits_equal": bool(torch.equal(mine.float(), theirs)),
            "logits_max_abs_diff": float((mine.float() - theirs).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--jobs", default="wanda:0.5,sparsegpt:0.5", help="method:sparsity,...")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--diag_nsamples", type=int, default=2)
    p.add_argument("--eval", default="none")
    p.add_argument("--save_dtype", default="auto", help="float32 makes a streamed run's perplexity (scored from its "
                                                         "shards) comparable with --load memory's (in memory, fp32)")
    p.add_argument("--max_windows", type=int, default=None)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--compare_memory", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--verify_dir", default=None, help="only verify this existing output of a job")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.verify_dir:
        row = {"out": args.verify_dir, "verify": verify(Path(args.verify_dir), args.prompt)}
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "results": [row]}, indent=2) + "\n")
        return
    results = []
    for job in args.jobs.split(","):
        method, rate = job.split(":")
        out = Path(args.workdir) / f"lazy-{method}-{rate}"
        row = {"lazy": run_job(args, method, float(rate), "lazy", out)}
        if args.verify:
            row["verify"] = verify(out, args.prompt)
        if args.compare_memory:
            mem = Path(args.workdir) / f"memory-{method}-{rate}"
            row["memory"] = run_job(args, method, float(rate), "memory", mem)
            row["weights_equal"] = _same_weights(out, mem)
            if not args.keep:
                shutil.rmtree(mem)
        if not args.keep:
            shutil.rmtree(out)
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")


def _same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


if __name__ == "__main__":
    main()
