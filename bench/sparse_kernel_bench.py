"""sparsellm's CPU sparse kernels (sparsellm.kernels) against dense fp32 PyTorch, in one process with
alternating repeats (sparsellm.evaluate.speed.compare), and how close decode comes to the memory bandwidth.

Default mode: SmolLM2-135M pruned with Wanda at 50%, 70%, 90% and 2:4 (made with `sparsellm prune` into
--work, reused if there), measured as
    dense fp32         the dense model in PyTorch
    dense kernels      the dense model through our kernels in the same storage precision (min_sparsity=0)
    wanda{50,70,90}, 2:4  the pruned models through our kernels (fp16 values)
    "<row> int8" etc.  with --values int8 (a comma list of int8, bfloat16, float32): the same models with the
                       kernels' values in that dtype (int8: per-row fp32 scales, pruned and quantized)
for decode tokens/s at batch 1 and 8 and prefill tokens/s at 128 and 512 tokens. Also: the machine's memory
bandwidth (sum of a 512 MB fp32 tensor), the bytes a decoded token reads (the swapped linears' format bytes
plus the dense weights left in PyTorch), and measured decode b1 tok/s against bandwidth / bytes.
--ppl_windows N: also the WikiText-2 perplexity (first N windows of --ppl_seqlen tokens) of every measured
model and of each pruned model as PyTorch fp32 ("<pattern> fp32", the weights exactly as pruned), and each
row's change against that ("ppl_change": ppl / reference - 1; the dense rows against "dense fp32").

--shape llama2-7b --blocks 2: random 7B-shaped blocks (bench/make_random_checkpoint.py's shapes), every linear
magnitude-pruned to --sparsity (per row), decode time per block (the 7 linears at one token) sparse vs dense.

    python bench/sparse_kernel_bench.py --threads 2 --out bench/results/sparse_kernels_smollm2.json
    python bench/sparse_kernel_bench.py --shape llama2-7b --blocks 2 --out bench/results/sparse_kernels_7b.json
    python bench/sparse_kernel_bench.py --quick --threads 2 --work /tmp/skb_work
    python bench/sparse_kernel_bench.py --patterns wanda70 --values int8 --ppl_windows 4 --threads 2 \
        --nsamples 16 --seqlen 512 --out bench/results/sparse_kernels_int8.json
        # fp16 vs int8 values: speed rows and the perplexity change, Wanda 70% on 16 x 512 calibration tokens
        # one pruned model (wanda70, calibrated on 2 x 64 tokens), the same lengths and batches, 2 repeats
        # of 8 new tokens after a 32-token prompt: a few minutes once the pruned copy exists
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_random_checkpoint import SHAPES  # noqa: E402

from sparsellm.kernels import BitmapWeight, build, sparsify, spmm  # noqa: E402

PATTERNS = {"wanda50": ["--sparsity_ratio", "0.5"], "wanda70": ["--sparsity_ratio", "0.7"],
            "wanda90": ["--sparsity_ratio", "0.9"], "wanda2:4": ["--sparsity_type", "2:4"]}


def bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: bytes of a `mib` MiB fp32 tensor over the median time of its sum."""
    a = torch.ones(mib * 2 ** 20 // 4)
    a.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def decode_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every SparseLinear's format plus every dense Linear's weight
    (embeddings are a row lookup, not counted)."""
    from sparsellm.kernels import SparseLinear

    n = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            n += m.weight_packed.nbytes
        elif isinstance(m, torch.nn.Linear):
            n += m.weight.numel() * m.weight.element_size()
    return n


def pruned(model: str, name: str, work: Path, nsamples: int, seqlen: int) -> Path:
    """The Wanda-pruned copy of `model` in work/name, made with `sparsellm prune` unless it is there."""
    from sparsellm.cli import main as cli

    out = work / name.replace(":", "")
    if not (out / "config.json").is_file():
        code = cli(["--quiet", "prune", "--model", model, "--prune_method", "wanda", *PATTERNS[name],
                    "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval", "none", "--out", str(out)])
        if code:
            raise SystemExit(f"sparsellm prune failed for {name} (exit {code})")
    return out


def value_speedups(res: dict, values: list[str]) -> dict:
    """{"<row> <value>": {measurement: {"median", "min", "max"}}}: each row with other values against the same
    row with fp16 values, from the per-repeat seconds of compare() (the two ran alternately, repeat by repeat)."""
    out = {}
    for name in res["seconds"]:
        for v in values:
            if name.endswith(f" {v}") and name[: -len(v) - 1] in res["seconds"]:
                base = res["seconds"][name[: -len(v) - 1]]
                out[name] = {}
                for k, times in res["seconds"][name].items():
                    r = [b / t for b, t in zip(base[k], times)]
                    out[name][k] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def value_ppl(args, models: dict, dirs: dict) -> dict:
    """WikiText-2 perplexity of every model in `models` and of each pruned model in PyTorch fp32, on the first
    args.ppl_windows windows of args.ppl_seqlen tokens: {"windows", "seqlen", "ppl": {name: ppl}, "reference":
    {name: the row it is compared with}, "ppl_change": {name: ppl / reference's ppl - 1}}."""
    from sparsellm.evaluate.perplexity import perplexity
    from sparsellm.models import load_model

    tok = load_model(args.model, torch.float32)[1]
    plain = {f"{n} fp32": d for n, d in dirs.items()}  # the pruned weights as they are, in PyTorch
    ppl, ref = {}, {}
    for name in [*models, *plain]:
        base = name.split(" ")[0]
        model = load_model(str(plain[name]), torch.float32)[0] if name in plain else models[name]
        t = time.perf_counter()
        r = perplexity(model, tok, "wikitext2", seqlen=args.ppl_seqlen, max_windows=args.ppl_windows, progress=False)
        ppl[name] = r["ppl"]
        ref[name] = "dense fp32" if base == "dense" else f"{base} fp32"
        print(f"ppl {name}: {r['ppl']:.4f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return {"windows": args.ppl_windows, "seqlen": args.ppl_seqlen, "dataset": "wikitext2", "ppl": ppl,
            "reference": ref, "ppl_change": {n: ppl[n] / ppl[ref[n]] - 1 for n in ppl}}


def model_mode(args) -> dict:
    from sparsellm.evaluate.speed import compare
    from sparsellm.models import load_model

    names = ["wanda70"] if args.quick else args.patterns.split(",") if args.patterns else list(PATTERNS)
    values = [v for v in args.values.split(",") if v]
    dirs = {n: pruned(args.model, n, Path(args.work), args.nsamples, args.seqlen) for n in names}
    dense = load_model(args.model, torch.float32)[0]
    models, swaps = {"dense fp32": dense}, {}
    for suffix, dtype in [("", torch.float16)] + [(f" {v}", getattr(torch, v)) for v in values]:
        dense_k = load_model(args.model, torch.float32)[0]
        # the decoder's linears only (dense_k.model has no output embedding): SmolLM2's lm_head holds 1% exact
        # zeros, so sparsify(dense_k) would swap it too, while the pruned models keep it dense in PyTorch
        swaps[f"dense kernels{suffix}"] = sparsify(dense_k.model, min_sparsity=0.0, dtype=dtype)
        models[f"dense kernels{suffix}"] = dense_k
    for n, d in dirs.items():
        for suffix, dtype in [("", torch.float16)] + [(f" {v}", getattr(torch, v)) for v in values]:
            m = load_model(str(d), torch.float32)[0]
            swaps[n + suffix] = sparsify(m, min_sparsity=0.3, dtype=dtype)
            models[n + suffix] = m
        if args.fp16_head:  # the same pruned model, its dense output embedding read as fp16 through our kernel too
            m = load_model(str(d), torch.float32)[0]
            rec = sparsify(m, min_sparsity=0.3, dtype=torch.float16)
            head = sparsify(m, min_sparsity=0.0, dtype=torch.float16, lm_head=True)  # only lm_head is left
            swaps[f"{n} + fp16 head"] = {**rec, "swapped": {**rec["swapped"], **head["swapped"]}}
            models[f"{n} + fp16 head"] = m
    res = compare(models, (128, 512), (1, 8), decode_prompt=32 if args.quick else 128,
                  new_tokens=8 if args.quick else 32, repeats=2 if args.quick else args.repeats,
                  warmup=1, threads=args.threads)
    bw = bandwidth_gbs(128 if args.quick else 512)
    res["bandwidth_gbs"] = bw
    res["bytes_per_token"], res["bandwidth_limit_tok_s"], res["decode_b1_of_limit"] = {}, {}, {}
    for n, m in models.items():
        b = decode_bytes(m)
        res["bytes_per_token"][n] = b
        res["bandwidth_limit_tok_s"][n] = bw * 1e9 / b
        res["decode_b1_of_limit"][n] = res["results"][n]["decode_b1"] / (bw * 1e9 / b)
    res["swaps"] = {n: {k: v for k, v in s.items() if k not in ("swapped", "skipped")} | {"swapped": len(s["swapped"])}
                    for n, s in swaps.items()}
    res["speedup_vs_fp16_values"] = value_speedups(res, values)
    if args.ppl_windows:
        res["perplexity"] = value_ppl(args, models, dirs)
    return res


def shape_mode(args) -> dict:
    """Decode time of one block's linears at one token, dense fp32 F.linear vs sparse kernels, per block."""
    cfg = SHAPES[args.shape]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    if args.quick:
        shapes = [(o // 8, n // 8) for o, n in shapes]
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(args.blocks):
        ws = []
        for o, n in shapes:
            w = torch.randn(o, n, generator=g)
            k = int(n * args.sparsity)
            w.scatter_(1, w.abs().argsort(1)[:, :k], 0.0)
            ws.append((w, BitmapWeight.pack(w, torch.float16)))
        blocks.append(ws)
    x = {n: torch.randn(1, n, generator=g) for _, n in shapes}
    times = {"dense fp32": [], "sparse kernels": []}
    for r in range(1 + (1 if args.quick else args.repeats)):
        for name in times:  # alternate
            t = time.perf_counter()
            for ws in blocks:
                for w, bw in ws:
                    F.linear(x[w.shape[1]], w) if name == "dense fp32" else spmm(bw, x[w.shape[1]])
            if r:
                times[name].append((time.perf_counter() - t) / len(blocks))
    med = {n: statistics.median(t) for n, t in times.items()}
    sparse_bytes = sum(bw.nbytes for bw_list in blocks for _, bw in bw_list) / len(blocks)
    bw = bandwidth_gbs(128 if args.quick else 512)
    return {"shape": args.shape, "blocks": args.blocks, "sparsity": args.sparsity, "threads": torch.get_num_threads(),
            "seconds_per_block": times, "median_ms_per_block": {n: v * 1e3 for n, v in med.items()},
            "speedup": med["dense fp32"] / med["sparse kernels"], "bandwidth_gbs": bw,
            "sparse_bytes_per_block": sparse_bytes,
            "sparse_of_bandwidth_limit": (sparse_bytes / (bw * 1e9)) / med["sparse kernels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="out/sparse_kernel_bench", help="where the pruned copies are made / reused")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--shape", choices=SHAPES, default=None, help="random blocks of this shape instead of --model")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patterns", default=None, help=f"comma list of pruned models (default all: {','.join(PATTERNS)})")
    ap.add_argument("--values", default="", help="extra value dtypes, comma list of int8, bfloat16, float32: each "
                                                  "kernel row again with its values in that dtype")
    ap.add_argument("--ppl_windows", type=int, default=0, help="also WikiText-2 perplexity on this many windows")
    ap.add_argument("--ppl_seqlen", type=int, default=2048)
    ap.add_argument("--fp16_head", action="store_true", help="also each pruned model with its dense lm_head read as fp16 through our kernel")
    ap.add_argument("--quick", action="store_true", help="smoke run: wanda70 only (or 1/8-width blocks), "
                                                          "short calibration, 2 repeats")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/sparse_kernels_*.json)")
    args = ap.parse_args()
    if args.quick:
        args.nsamples, args.seqlen = min(args.nsamples, 2), min(args.seqlen, 64)
    for v in filter(None, args.values.split(",")):
        if v not in ("int8", "bfloat16", "float32"):
            ap.error(f"--values: {v!r} is not one of int8, bfloat16, float32")
    for n in filter(None, (args.patterns or "").split(",")):
        if n not in PATTERNS:
            ap.error(f"--patterns: {n!r} is not one of {', '.join(PATTERNS)}")
    ext = build.load()
    res = shape_mode(args) if args.shape else model_mode(args)
    res.update(isa=ext.isa() if ext is not None else "pytorch-csr-fallback", quick=args.quick,
               torch=torch.__version__)
    tag = (args.shape or Path(args.model).name) + ("_quick" if args.quick else "")
    out = Path(args.out or ROOT / "bench" / "results" / f"sparse_kernels_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("seconds", "seconds_per_block")}, indent=1,
                     default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
