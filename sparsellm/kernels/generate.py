"""KV-cache greedy generation with its prefill and decode speed: what `sparsellm generate` prints, and a
measurement `sparsellm bench --kernels sparse` and bench/sparse_kernel_bench.py share (through
sparsellm.evaluate.speed, whose prefill/decode timings are the same forward calls)."""

from __future__ import annotations

import time

import torch

from ..evaluate.speed import _cache, cache_kwarg


@torch.no_grad()
def generate_timed(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> dict:
    """Greedy generation from `input_ids` (batch, prompt) int64 with a KV cache: one prefill forward, then one
    forward per new token, stopping early when every row has produced `eos_token_id`. Returns {"ids": (batch,
    prompt + new) int64, "prompt_tokens", "new_tokens" (per row), "prefill_s", "decode_s", "prefill_tok_s"
    (batch * prompt / prefill_s), "decode_tok_s" (batch * (new - 1) / decode_s: the first new token comes
    from the prefill, None when only one was made)}."""
    kw = cache_kwarg(model)
    t0 = time.perf_counter()
    out = model(input_ids, use_cache=True)
    past, nxt = _cache(out), out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    tokens, done = [nxt], torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done |= nxt[:, 0] == eos_token_id
            if done.all():
                break
        out = model(nxt, use_cache=True, **{kw: past})
        past, nxt = _cache(out), out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    t2 = time.perf_counter()
    b, n = input_ids.shape[0], len(tokens)
    return {"ids": torch.cat([input_ids, *tokens], 1), "prompt_tokens": input_ids.shape[1], "new_tokens": n,
            "prefill_s": t1 - t0, "decode_s": t2 - t1, "prefill_tok_s": b * input_ids.shape[1] / (t1 - t0),
            "decode_tok_s": b * (n - 1) / (t2 - t1) if n > 1 else None}
