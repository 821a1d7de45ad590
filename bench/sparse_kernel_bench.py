"""sparsellm's CPU sparse kernels (sparsellm.kernels) against dense fp32 PyTorch, in one process with
alternating repeats (sparsellm.evaluate.speed.compare), and how close decode comes to the memory bandwidth.

Default mode: SmolLM2-135M pruned with Wanda at 50%, 70%, 90% and 2:4 (made with `sparsellm prune` into
--work, reused if there), measured as
    dense fp32         the dense model in PyTorch
    dense kernels      the dense model through our kernels in the same storage precision (min_sparsity=0)
    wanda{50,70,90}, 2:4  the pruned models through our kernels (fp16 values)
for decode tokens/s at batch 1 and 8 and prefill tokens/s at 128 and 512 tokens. Also: the machine's memory
bandwidth (sum of a 512 MB fp32 tensor), the bytes a decoded token reads (the swapped linears' format bytes
plus the dense weights left in PyTorch), and measured decode b1 tok/s against bandwidth / bytes.

--shape llama2-7b --blocks 2: random 7B-shaped blocks (bench/make_random_checkpoint.py's shapes), every linear
magnitude-pruned to --sparsity (per row), decode time per block (the 7 linears at one token) sparse vs dense.

    python bench/sparse_kernel_bench.py --threads 2 --out bench/results/sparse_kernels_smollm2.json
    python bench/sparse_kernel_bench.py --shape llama2-7b --blocks 2 --out bench/results/sparse_kernels_7b.json
    python bench/sparse_kernel_bench.py --quick --threads 2 --work /tmp/skb_work
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


def model_mode(args) -> dict:
    from sparsellm.evaluate.speed import compare
    from sparsellm.models import load_model

    names = ["wanda70"] if args.quick else list(PATTERNS)
    dirs = {n: pruned(args.model, n, Path(args.work), args.nsamples, args.seqlen) for n in names}
    dense = load_model(args.model, torch.float32)[0]
    dense_k = load_model(args.model, torch.float32)[0]
    # the decoder's linears only (dense_k.model has no output embedding): SmolLM2's lm_head holds 1% exact
    # zeros, so sparsify(dense_k) would swap it too, while the pruned models keep it dense in PyTorch
    swaps = {"dense kernels": sparsify(dense_k.model, min_sparsity=0.0, dtype=torch.float16)}
    models = {"dense fp32": dense, "dense kernels": dense_k}
    for n, d in dirs.items():
        m = load_model(str(d), torch.float32)[0]
        swaps[n] = sparsify(m, min_sparsity=0.3, dtype=torch.float16)
        models[n] = m
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
    ap.add_argument("--fp16_head", action="store_true", help="also each pruned model with its dense lm_head read as fp16 through our kernel")
    ap.add_argument("--quick", action="store_true", help="smoke run: wanda70 only (or 1/8-width blocks), "
                                                          "short calibration, 2 repeats")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/sparse_kernels_*.json)")
    args = ap.parse_args()
    if args.quick:
        args.nsamples, args.seqlen = min(args.nsamples, 2), min(args.seqlen, 64)
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
