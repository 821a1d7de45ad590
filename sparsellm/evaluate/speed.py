"""Measured inference speed in PyTorch (algorithms.md §10.3): prefill and KV-cache decode throughput of a
model against a dense baseline, in one process, with the same prompts, pinned threads, warm-up, and the
median of repeated runs taken in alternation (baseline, model, baseline, model, ...), so that a noisy,
shared machine affects both alike. Each repeat's times are kept, and every ratio comes with the spread of
its per-repeat ratios: a ratio whose spread contains 1.0 is within noise, not a speed-up or a slow-down.

Unstructured and N:M zeros give no speed in dense PyTorch kernels (the saved weights are dense tensors
with exact zeros); the ratio is reported as measured, ~1.0 or below. Structurally pruned models are smaller
and faster everywhere. 2:4 kernels (`torch.sparse.to_sparse_semi_structured`) exist only on CUDA.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time

import torch

from ..errors import UsageError


def _prompt(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 1), (batch, length), generator=g)


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA launches return before the work is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Wall time of one forward over `ids` (batch, length), computing the logits of the last position only.
    `ids` is moved to the model's device first (not timed); on CUDA the time runs until the GPU is done."""
    dev = _device(model)
    ids = ids.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        model(ids, use_cache=False)
    _sync(dev)
    return time.perf_counter() - t0


def cache_kwarg(model) -> str:
    """The name of the keyword argument that passes a KV cache to `model.forward`: "cache" where the forward
    has it (transformers 5.24 renamed `past_key_values` to `cache`; the old name warns), else
    "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of `new_tokens` greedy decode steps with a KV cache, after a prefill of `ids` (not timed).
    `ids` is moved to the model's device first; on CUDA the time runs until the GPU is done."""
    kw = cache_kwarg(model)
    dev = _device(model)
    out = model(ids.to(dev), use_cache=True)
    past, nxt = _cache(out), out.logits[:, -1:].argmax(-1)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, use_cache=True, **{kw: past})
        past, nxt = _cache(out), out.logits[:, -1:].argmax(-1)
    _sync(dev)
    return time.perf_counter() - t0


def compare(models: dict, prefill_lengths=(128, 512, 2048), decode_batches=(1, 8), decode_prompt: int = 128,
            new_tokens: int = 32, repeats: int = 5, warmup: int = 1, threads: int | None = None,
            progress: bool = True, cuda_graphs: bool = False) -> dict:
    """Throughput of every model in `models` ({name: model}; the first is the baseline) on identical
    prompts. Returns {"threads", "settings", "results": {name: {"prefill@L": tokens/s, "decode_b{B}": tokens/s}},
    "ratios": {name: {...}: throughput / baseline's}, "ratio_spread": {name: {...}: `ratio_spread` of the
    per-repeat ratios}, "seconds": {name: {...}: every timed repeat's wall time, in order}}. Throughputs are
    medians of `repeats` runs after `warmup`. A setting past the model's context is left out and named in
    `settings["skipped_past_context"]` (and on stderr with `progress`). `cuda_graphs`: every prefill and
    decode step is captured once in a CUDA graph and replayed (`cuda_graphs.GraphedPrefill`,
    `GraphedDecode`; decode from a static KV cache), one setting at a time (every model's graphs of that
    setting are alive together, and freed before the next). Raises UsageError for non-positive settings, or for
    `cuda_graphs` with a model off CUDA."""
    if repeats < 1 or warmup < 0 or new_tokens < 1 or decode_prompt < 1:
        raise UsageError("repeats, new_tokens and the decode prompt must be >= 1, warmup >= 0")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    names = list(models)
    first = models[names[0]]
    if cuda_graphs and any(_device(m).type != "cuda" for m in models.values()):
        raise UsageError("CUDA graphs need every model on a CUDA device")
    vocab = first.config.vocab_size
    ctx = getattr(first.config, "max_position_embeddings", 2048) or 2048
    wanted = [(f"prefill@{L}", 1, L, None) for L in prefill_lengths]  # (key, batch, prompt, decode steps)
    wanted += [(f"decode_b{B}", B, decode_prompt, new_tokens) for B in decode_batches]
    jobs = [(key, _prompt(vocab, b, L), steps) for key, b, L, steps in wanted if L + (steps or 0) <= ctx]
    skipped = [key for key, _, L, steps in wanted if L + (steps or 0) > ctx]
    if not jobs:
        raise UsageError(f"every prefill length and the decode prompt + new tokens exceed the model's context ({ctx})")
    if skipped and progress:
        print(f"skipped (past the model's context of {ctx} tokens): {', '.join(skipped)}", file=sys.stderr, flush=True)
    results = {n: {} for n in names}
    seconds = {n: {} for n in names}
    for key, ids, steps in jobs:
        times = {n: [] for n in names}
        timers = {n: _timer(models[n], ids, steps, cuda_graphs) for n in names}
        for r in range(warmup + repeats):
            for n in names:  # alternate, so drifts in machine load hit every model alike
                t = timers[n]()
                if r >= warmup:
                    times[n].append(t)
        del timers  # captured graphs hold their memory pools
        if cuda_graphs:
            torch.cuda.empty_cache()
        tokens = ids.numel() if steps is None else ids.shape[0] * steps
        for n in names:
            results[n][key] = tokens / statistics.median(times[n])
            seconds[n][key] = times[n]
        if progress:
            print(f"{key}: " + "  ".join(f"{n} {results[n][key]:.1f} tok/s" for n in names), flush=True)
    base = results[names[0]]
    ratios = {n: {k: v / base[k] for k, v in results[n].items()} for n in names[1:]}
    spread = {n: {k: ratio_spread(seconds[names[0]][k], seconds[n][k]) for k in results[n]} for n in names[1:]}
    return {"threads": torch.get_num_threads(), "results": results, "ratios": ratios, "ratio_spread": spread,
            "seconds": seconds,
            "settings": {"prefill_lengths": [j[0] for j in jobs if j[2] is None], "decode_prompt": decode_prompt,
                         "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "baseline": names[0],
                         "cuda_graphs": cuda_graphs, "skipped_past_context": skipped},
            "device": str(_device(first))}


def _timer(model, ids, steps, graphs: bool):
    """A callable returning the seconds of one prefill (`steps` None) or one decode of `steps` tokens."""
    if graphs:
        from .cuda_graphs import GraphedDecode, GraphedPrefill

        return GraphedPrefill(model, ids) if steps is None else GraphedDecode(model, ids, steps)
    return (lambda: prefill_seconds(model, ids)) if steps is None else (lambda: decode_seconds(model, ids, steps))


def ratio_spread(base_seconds: list[float], seconds: list[float]) -> dict:
    """The spread of a throughput ratio over repeats. Repeat r of the model ran right after repeat r of the
    baseline in the same process, so base_seconds[r] / seconds[r] is that repeat's ratio. Returns {"repeats",
    "min", "q1", "median", "q3", "max" (of the per-repeat ratios; quartiles by linear interpolation),
    "within_noise": min <= 1 <= max (the ratio is not a measured difference), None with one repeat}."""
    ratios = sorted(b / t for b, t in zip(base_seconds, seconds))
    n = len(ratios)

    def q(f):
        x = f * (n - 1)
        lo = int(x)
        return ratios[lo] + (ratios[min(lo + 1, n - 1)] - ratios[lo]) * (x - lo)

    return {"repeats": n, "min": ratios[0], "q1": q(0.25), "median": q(0.5), "q3": q(0.75), "max": ratios[-1],
            "within_noise": None if n < 2 else ratios[0] <= 1.0 <= ratios[-1]}
