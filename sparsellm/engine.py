"""The sequential block-wise engine (algorithms.md §1.2): the only place that knows about hooks and replay.

    capture X_0 = inputs of block 0 for every calibration window, with every keyword argument the model
    passes to each block (position_embeddings, attention_mask (possibly None), position_ids, ...)
    for block i:
        hooks on its linears accumulate fp32 statistics while it runs on X_i  -> dense outputs Y_i
        prune every linear of block i at rate r_i
        re-run the pruned block on X_i -> X_{i+1} (next inputs come from the pruned model);
        the local reconstruction error is ‖Y_i − X_{i+1}‖_F / ‖Y_i‖_F

Only the decoder blocks run: no lm_head over the calibration tokens. Memory is the model plus two
activation buffers of shape (nsamples, seqlen, hidden) in the model's dtype.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import block_linears, get_blocks
from .prune import PRUNERS, LayerStats

log = logging.getLogger("sparsellm")


def auto_batch_size(seqlen: int, tokens: int = 8192) -> int:
    """Calibration windows per block forward: about `tokens` tokens per micro-batch (bigger GEMMs run
    about twice as fast on CPU as one 512-token window at a time)."""
    return max(1, tokens // seqlen)


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Run the model up to block 0 for every window and record its inputs.

    input_ids: (nsamples, seqlen) int64. Returns X (nsamples, seqlen, hidden) in the model's dtype, and
    for every block the keyword arguments the model passes to it (recorded once, on the first window,
    whose forward runs up to the last block; they do not depend on the window's tokens)."""
    blocks = get_blocks(model)
    device = next(model.parameters()).device
    kwargs_per_block: list[dict | None] = [None] * len(blocks)
    X: torch.Tensor | None = None
    state = {"sample": 0, "stop_at": len(blocks) - 1}

    def make_hook(idx):
        def hook(module, args, kwargs):
            nonlocal X
            hidden = args[0] if args else kwargs["hidden_states"]
            if kwargs_per_block[idx] is None:
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if len(args) > 1:
                    kw["_args"] = args[1:]
                kwargs_per_block[idx] = kw
            if idx == 0:
                if X is None:
                    X = torch.empty((input_ids.shape[0], *hidden.shape[1:]), dtype=hidden.dtype, device=device)
                X[state["sample"]] = hidden[0]
            if idx == state["stop_at"]:
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for s in range(input_ids.shape[0]):
            state["sample"] = s
            state["stop_at"] = len(blocks) - 1 if s == 0 else 0
            try:
                model(input_ids[s : s + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return X, kwargs_per_block


def run_block(block: nn.Module, X: torch.Tensor, kwargs: dict, out: torch.Tensor, batch_size: int = 1,
              compare: bool = False) -> tuple[float, float]:
    """out[b] = block(X[b]) over micro-batches. With `compare`, out holds the reference outputs on entry
    and the function returns (Σ‖ref − new‖², Σ‖ref‖²) before overwriting them."""
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    num = den = 0.0
    for b in range(0, X.shape[0], batch_size):
        y = _first(block(X[b : b + batch_size], *args, **kw))
        if compare:
            ref = out[b : b + batch_size].float()
            num += float(((ref - y.float()) ** 2).sum())
            den += float((ref ** 2).sum())
        out[b : b + batch_size] = y
    return num, den


@torch.no_grad()
def prune_blocks(model: nn.Module, input_ids: torch.Tensor, method: str, rates: list[float], nm=None,
                 options: dict | None = None, batch_size: int | None = None, progress: bool = True,
                 on_block_end=None) -> list[dict]:
    """Prune every decoder block of `model` in place, block by block, with `method` at `rates[i]`.

    input_ids: (nsamples, seqlen) calibration windows. nm: an N:M pattern or None. options: extra keyword
    arguments for the pruner (blocksize, percdamp). batch_size: windows per block forward (None: auto). on_block_end(i, X_next) is called after each block
    with its pruned outputs (nsamples, seqlen, hidden). Returns one dict per block: target, measured
    sparsity, per-module sparsity, local relative reconstruction error and seconds."""
    pruner = PRUNERS[method]
    blocks = get_blocks(model)
    if len(rates) != len(blocks):
        raise ValueError(f"{len(rates)} rates for {len(blocks)} blocks")
    options = options or {}
    batch_size = batch_size or auto_batch_size(input_ids.shape[1])
    if pruner.STATS == "none":  # magnitude needs no calibration data: no forwards, no reconstruction error
        return [_prune_block(model, i, block, pruner, None, rates[i], nm, options, time.perf_counter())
                for i, block in enumerate(blocks)]
    t0 = time.perf_counter()
    X, kwargs = capture_inputs(model, input_ids)
    Y = torch.empty_like(X)
    log.info("captured block-0 inputs %s in %.1fs", tuple(X.shape), time.perf_counter() - t0)
    results = []
    for i, block in enumerate(tqdm(blocks, desc=method, unit="block", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        stats = _gather_stats(block, block_linears(model, block), pruner.STATS,
                              lambda: run_block(block, X, kwargs[i], Y, batch_size))  # Y = dense outputs
        res = _prune_block(model, i, block, pruner, stats, rates[i], nm, options, t0,
                           lambda: run_block(block, X, kwargs[i], Y, batch_size, compare=True))  # Y = pruned
        X, Y = Y, X
        results.append(res)
        if on_block_end is not None:
            on_block_end(i, X)
    return results


def _gather_stats(block, linears: dict, need: str, forward) -> dict:
    """Run `forward()` with hooks that accumulate each linear's input statistics (fp32). Linears that read
    the very same tensor (q/k/v, gate/up) share one LayerStats, gathered once."""
    stats = {name: LayerStats() for name in linears}
    alias, last = {}, {}

    def make_hook(name):
        def hook(mod, inp, out):
            x = inp[0]
            owner = next((n for n, t in last.items() if t is x and n != name), None)
            if owner is not None:
                alias[name] = owner
                return
            last[name] = x  # only the current micro-batch's inputs are kept alive
            stats[name].add(x, need)
        return hook

    handles = [lin.register_forward_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
        last.clear()
    for name, owner in alias.items():
        stats[name] = stats[owner]
    return stats


def _prune_block(model, i, block, pruner, stats, rate, nm, options, t0, replay=None) -> dict:
    """Prune every linear of block i at `rate` (or `nm`), then `replay()` the block if given, which returns
    (Σ‖ref − new‖², Σ‖ref‖²) for the relative reconstruction error. Returns the block's report entry."""
    linears = block_linears(model, block)
    target = rate if nm is None else nm.sparsity
    modules = {}
    for name, lin in linears.items():
        W = lin.weight.data
        if rate > 0 or nm is not None:
            W.copy_(pruner.prune(W.float(), stats and stats[name], rate, nm, **options).to(W.dtype))
        modules[name] = {"target": target, "measured": float((W == 0).sum()) / W.numel()}
    err = None
    if replay is not None:
        num, den = replay()
        err = (num / den) ** 0.5 if den > 0 else 0.0
    zeros = sum(m["measured"] * linears[n].weight.numel() for n, m in modules.items())
    total = sum(lin.weight.numel() for lin in linears.values())
    res = {"block": i, "target": target, "measured": zeros / total, "rel_error": err,
           "seconds": time.perf_counter() - t0, "modules": modules}
    log.info("block %3d  target %.4f  measured %.4f  rel_error %s  %.2fs", i, target, res["measured"],
             "-" if err is None else f"{err:.4e}", res["seconds"])
    return res


def linear_sparsity(model: nn.Module) -> dict:
    """Exact-zero counts over all prunable linears of the decoder blocks (algorithms.md §1.3)."""
    zeros = total = 0
    for block in get_blocks(model):
        for lin in block_linears(model, block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return {"zeros": zeros, "params": total, "sparsity": zeros / total if total else 0.0}
