"""`sparsellm generate`: greedy KV-cache generation, printing the text and prefill / decode tokens/s."""

from __future__ import annotations

import sys

from ..runs.generate import GenerateRun
from .common import add_config, add_quiet, config_from


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text greedily with a KV cache and print prefill/decode tokens/s")
    add_config(p, GenerateRun(), required=("model",))
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..runs.generate import run_generate

    res = run_generate(config_from(args, GenerateRun))
    print(res["text"])
    swap = res["swap"]
    where = (f"sparse kernels ({swap['isa']}, {swap['dtype']} values, {len(swap['swapped'])} linears swapped)"
             if swap else "dense PyTorch fp32")
    decode = f"{res['decode_tok_s']:.1f} tok/s" if res["decode_tok_s"] is not None else "n/a (one token)"
    print(f"prefill: {res['prompt_tokens']} tokens, {res['prefill_tok_s']:.1f} tok/s; decode: {res['new_tokens']} "
          f"tokens, {decode}; {where}, {res['threads']} threads", file=sys.stderr)
    return 0
