"""Write a random-weight Hugging Face LLaMA checkpoint of a given shape, as sharded safetensors with
model.safetensors.index.json, config.json and a tokenizer, for benchmarks that need a model of a real size.

    python bench/make_random_checkpoint.py --out /tmp/llama7b-rand --shape llama2-7b   # 13.76 GB in bf16
    python bench/make_random_checkpoint.py --out /tmp/tiny-rand --shape tiny --dtype float32

Tensors are generated and written one shard at a time (peak memory is about one shard, --max_shard_size GB),
into a temporary directory next to --out that is renamed into place at the end, so a killed run never leaves
something that looks complete. Values depend only on --seed: each tensor gets its own torch.Generator seeded
with seed * 100003 + its index; linear and embedding weights are normal with std 0.02, norm weights are ones.

The tokenizer is the default model's (SmolLM2-135M, from sparsellm's cached conversion), since no LLaMA
tokenizer can be downloaded here, so the vocabulary is 49152, not LLaMA-2's 32000: llama2-7b has 6.88e9
parameters (6.74e9 with 32000), 13.76 GB in bf16 (9 shards). Names and shapes are checked against
LlamaForCausalLM built on the meta device. Prints one JSON line: out, shape, dtype, params, bytes, shards, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STD = 0.02


def tensor_groups(cfg) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) of every LlamaForCausalLM weight, grouped: embeddings, one group per decoder block, final
    norm and lm_head. A group is kept in one shard where it fits."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    d = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * d
    groups = [[("model.embed_tokens.weight", (v, h))]]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        groups.append([(p + "self_attn.q_proj.weight", (cfg.num_attention_heads * d, h)),
                       (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                       (p + "self_attn.o_proj.weight", (h, cfg.num_attention_heads * d)),
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i)),
                       (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))])
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return groups


def check_against_meta_model(cfg, names: dict[str, tuple[int, ...]]) -> None:
    """Raise if the names or shapes differ from those of the model transformers builds from `cfg`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    ref = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if ref != names:
        diff = sorted(set(ref.items()) ^ set(names.items()))
        raise SystemExit(f"make_random_checkpoint: tensor plan differs from {type(model).__name__}: {diff[:6]}")


def plan_shards(groups, itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Pack groups into shards of at most `max_bytes` each (a single tensor larger than that gets its own
    shard); a group that does not fit in an empty shard is split tensor by tensor."""
    size = lambda shape: itemsize * torch.Size(shape).numel()  # noqa: E731
    shards, cur, cur_bytes = [], [], 0

    def add(items):
        nonlocal cur, cur_bytes
        b = sum(size(s) for _, s in items)
        if cur and cur_bytes + b > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur, cur_bytes = cur + items, cur_bytes + b

    for group in groups:
        if sum(size(s) for _, s in group) <= max_bytes:
            add(group)
        else:
            for item in group:
                add([item])
    if cur:
        shards.append(cur)
    return shards


def make_tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(STD).to(dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--max_shard_size", type=float, default=2.0, help="GB (10^9 bytes) per shard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"make_random_checkpoint: {out} exists and is not an empty directory; choose a new --out",
              file=sys.stderr)
        sys.exit(2)
    if not args.max_shard_size > 0:
        print("make_random_checkpoint: --max_shard_size must be > 0", file=sys.stderr)
        sys.exit(2)

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from sparsellm.models.load import _gguf_to_hf_dir, preset_gguf
    from sparsellm.outputs import apply_umask

    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    tok = AutoTokenizer.from_pretrained(_gguf_to_hf_dir(preset_gguf("smollm2-135m")))
    cfg = LlamaConfig(**SHAPES[args.shape], vocab_size=-(-len(tok) // 64) * 64, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, dtype=args.dtype, architectures=["LlamaForCausalLM"])
    groups = tensor_groups(cfg)
    order = [item for group in groups for item in group]
    check_against_meta_model(cfg, dict(order))
    index_of = {name: k for k, (name, _) in enumerate(order)}
    shards = plan_shards(groups, dtype.itemsize, int(args.max_shard_size * 1e9))
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for file, shard in zip(files, shards):
            tensors = {name: make_tensor(name, shape, dtype, args.seed * 100003 + index_of[name])
                       for name, shape in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        apply_umask(tmp)  # mkdtemp's 0700, safetensors' 0600
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(torch.Size(s).numel() for _, s in order)
    print(json.dumps({"out": str(out), "shape": args.shape, "dtype": args.dtype, "params": params,
                      "bytes": total, "shards": len(files), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
