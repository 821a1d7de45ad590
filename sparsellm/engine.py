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
import math
import time

from tqdm.auto import tqdm

from . import distributed, single_pass
from .checks import check_stats
from .lazy import lazy_import, no_grad
from .models import block_linears, get_arch, get_blocks
from .onload import fits_on_device, onloader
from .block_work import gather_stats, log_block, prune_block, run_block
from .registry import get

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

log = logging.getLogger("sparsellm")


def auto_batch_size(seqlen: int, tokens: int = 2048) -> int:
    """Calibration windows per block forward: about `tokens` tokens per micro-batch, at least one window.
    On a 2-core CPU, SmolLM2-135M's two passes per block ran in 0.80–0.85× the time at 2048 tokens per
    forward that they took at 8192, with a quarter of the transient memory (121 against 480 MiB), and 512
    tokens was slower again (bench/microbatch_bench.py, BENCHMARKS.md §1)."""
    return max(1, tokens // seqlen)


class _Stop(Exception):
    pass


@no_grad
def capture_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Run the model up to block 0 for every window and record its inputs.

    input_ids: (nsamples, seqlen) int64. Returns X (nsamples, seqlen, hidden) in the model's dtype, and
    for every block the keyword arguments the model passes to it (recorded once, on the first window, with
    every block's forward replaced by the identity: they do not depend on the hidden states). Only the
    modules before block 0 run, on the compute device (`onload`). X is on that device when it fits next to
    one block's work (`onload.fits_on_device`), else in pinned CPU memory, streamed per micro-batch."""
    blocks = get_blocks(model)
    on = onloader(model)
    device = on.device
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
                    X = _activation_buffer(model, (input_ids.shape[0], *hidden.shape[1:]), hidden.dtype, device)
                X[state["sample"]] = hidden[0]
            if idx == state["stop_at"]:
                raise _Stop

        return hook

    def identity(hidden_states=None, *args, **kwargs):
        return hidden_states

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = identity
    try:
        with on.embeddings():
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
        for b in blocks:
            del b.forward
    return X, kwargs_per_block


def _activation_buffer(model, shape, dtype, device) -> torch.Tensor:
    """A calibration activation buffer: on `device` when the engine's buffers (two, four with the
    diagnostic stream) fit there next to two blocks and a Hessian, else in pinned CPU memory (logged)."""
    if torch.device(device).type == "cpu":
        return torch.empty(shape, dtype=dtype)
    nbytes = 4 * math.prod(shape) * dtype.itemsize
    block = get_blocks(model)[0]
    block_bytes = sum(p.numel() * dtype.itemsize for p in block.parameters())
    widest = max(lin.in_features for lin in block_linears(model, block).values())
    if fits_on_device(device, nbytes, 2 * block_bytes + 3 * 4 * widest ** 2):
        log.info("calibration activations (%.2f GiB) stay on %s", nbytes / 2**30, device)
        return torch.empty(shape, dtype=dtype, device=device)
    log.info("calibration activations (%.2f GiB) do not fit on %s: kept in pinned CPU memory and streamed "
             "per micro-batch", nbytes / 2**30, device)
    return torch.empty(shape, dtype=dtype, pin_memory=True)


@no_grad
def prune_blocks(model: nn.Module, input_ids: torch.Tensor | None, method: str, rates: list, nm=None,
                 options: dict | None = None, batch_size: int | None = None, progress: bool = True,
                 on_block_end=None, diag_nsamples: int = 0, captured=None, resume: dict | None = None,
                 engine: str = "block") -> list[dict]:
    """Prune every decoder block of `model` in place, block by block, with `method` at `rates[i]`.

    input_ids: (nsamples, seqlen) calibration windows, or None with `captured` = (X, kwargs) from
    `capture_inputs` (X is not modified, so one capture serves many runs, as in ATP's β search).
    rates[i]: block i's sparsity, or a dict {linear name: sparsity} (OWL's layer granularity).
    nm: an N:M pattern or None. options: the pruner's config as keyword arguments (SparseGPT: blocksize, percdamp).
    batch_size: windows per block forward (None: auto). on_block_end(i, X_next, D_next, result) is called
    after each block with its pruned outputs (nsamples, seqlen, hidden), the dense stream's outputs (or None)
    and its report entry. resume: {"block": k, "X": X_k, "D": D_k or None, "results": the first k entries}
    continues at block k from the inputs `on_block_end` gave for it (the result is that of a run without a
    break). engine: "block" (statistics pass, prune, replay: two forwards per block) or "single" (one forward
    per block, each group of linears pruned from its actual inputs: `single_pass.py`). Each block is on the compute device only while it is worked on (`onload`). Under several
    processes (`distributed`) each runs its share of the windows (X, D and on_block_end's tensors hold those)
    and every process prunes from the statistics summed over all: the same weights and report on each.

    diag_nsamples > 0 turns on the reconstruction-error-explosion diagnostic (ATP, §3.2): the first
    diag_nsamples windows also run through the dense blocks, and each block reports `cum_error`
    = ‖Y_dense − Y_pruned‖_F / ‖Y_dense‖_F of its outputs, with dense inputs for Y_dense and the pruned
    model's inputs for Y_pruned, next to `rel_error` (local: the same, pruned-path inputs for both).
    For magnitude, which needs no calibration data, the forwards then run on those windows only.

    Returns one dict per block: target, measured sparsity, per-module sparsity (target, measured, and
    `input`: the fraction of zeros before pruning), `refilled` (zeros before pruning that are not zero
    after it), params (the block linears' weights), rel_error, cum_error and seconds.
    Raises NonFiniteError, naming the linear, for a NaN/inf weight, calibration statistic or pruned weight."""
    pruner = get("pruner", method)
    blocks = get_blocks(model)
    on = onloader(model)
    if len(rates) != len(blocks):
        raise ValueError(f"{len(rates)} rates for {len(blocks)} blocks")
    options = options or {}
    start = resume["block"] if resume else 0
    results = list(resume["results"]) if resume else []
    if pruner.needs == "none" and not diag_nsamples:  # magnitude: no forwards, no reconstruction error
        for i in range(start, len(blocks)):
            t0 = time.perf_counter()
            res = log_block(prune_block(model, i, on.block(i), pruner, None, rates[i], nm, options, t0))
            on.release(i, changed=True)
            results.append(res)
            if on_block_end is not None:
                on_block_end(i, None, None, res)
        return results
    t0 = time.perf_counter()
    # several processes (distributed.py): each runs its share of the windows, the diagnostic windows among
    # them; statistics and error sums are added over the processes. Magnitude (no statistics): every
    # process runs all the (few) diagnostic windows itself, with nothing to add.
    n = (input_ids if captured is None else captured[0]).shape[0]
    sharded = distributed.world()[1] > 1 and pruner.needs != "none"
    part = distributed.shard_windows(n) if sharded else slice(0, n)
    add_up = distributed.all_reduce_sums if sharded else (lambda *sums: sums)
    if captured is None:
        if pruner.needs == "none":
            input_ids = input_ids[:diag_nsamples]
        elif sharded:
            input_ids, part = distributed.local_windows(input_ids)
        X, kwargs = capture_inputs(model, input_ids)
        log.info("captured block-0 inputs %s in %.1fs", tuple(X.shape), time.perf_counter() - t0)
    else:
        X, kwargs = captured
        X = X[:diag_nsamples] if pruner.needs == "none" else X[part]
        X = X.clone()
    batch_size = batch_size or auto_batch_size(X.shape[1])
    k = min(diag_nsamples, n)  # diagnostic windows in all; this process holds the first `kl` of its share
    kl = distributed.local_prefix(n, k, part) if sharded else k
    if resume:
        X.copy_(resume["X"])
    Y = torch.empty_like(X, pin_memory=X.is_pinned())
    D = (resume["D"].to(X.device) if resume else X[:kl]).clone() if k else None  # dense stream (cumulative error)
    Dn = torch.empty_like(D) if k else None
    for i in tqdm(range(start, len(blocks)), desc=method, unit="block", disable=not progress, leave=False,
                  initial=start, total=len(blocks)):
        t0 = time.perf_counter()
        block = on.block(i)
        if k:
            run_block(block, D, kwargs[i], Dn, batch_size)  # dense block on dense inputs
        if engine == "single":
            res = single_pass.prune_block(model, i, block, pruner, rates[i], nm, options, X, kwargs[i], Y,
                                          batch_size, sharded, (k, kl), add_up, t0)
        else:
            stats = gather_stats(block, block_linears(model, block), pruner.needs,
                                 lambda: run_block(block, X, kwargs[i], Y, batch_size))  # Y = dense outputs
            if sharded:
                distributed.all_reduce_stats(stats)
            check_stats(f"{get_arch(model).blocks}.{i}", stats)
            res = prune_block(model, i, block, pruner, stats, rates[i], nm, options, t0,
                              lambda: add_up(*run_block(block, X, kwargs[i], Y, batch_size, compare=True)))
            del stats
        on.release(i, changed=True)
        X, Y = Y, X
        if k:
            ref = Dn.float()
            num = float(((ref - X[:kl].to(ref.device).float()) ** 2).sum())
            num, den = add_up(num, float((ref ** 2).sum()))
            res["cum_error"] = (num / den) ** 0.5 if den > 0 else 0.0
            D, Dn = Dn, D
        res["seconds"] = time.perf_counter() - t0
        results.append(log_block(res))
        if on_block_end is not None:
            on_block_end(i, X, D, res)
    return results


@no_grad
def dense_walk(model: nn.Module, input_ids: torch.Tensor, need: str | None = None,
               batch_size: int | None = None, progress: bool = True):
    """Run the dense model block by block on calibration windows, without pruning, and yield
    (i, block, X_i, stats) for every block: X_i (nsamples, seqlen, hidden) are block i's inputs and
    `stats` its linears' LayerStats ("norm" or "hessian"), or None when `need` is None. The pre-pass of
    the data-driven allocators (OWL's outlier ratios, RMI's Gram matrices). X_i is reused afterwards:
    consume it before asking for the next block. Under several processes (`distributed`) a walk with `need`
    runs this process's share of the windows (X_i holds those) and `stats` are the sums over all of them;
    without `need` every process walks all windows."""
    sharded = need is not None and distributed.world()[1] > 1
    if sharded:
        input_ids, _ = distributed.local_windows(input_ids)
    X, kwargs = capture_inputs(model, input_ids)
    batch_size = batch_size or auto_batch_size(X.shape[1])
    Y = torch.empty_like(X, pin_memory=X.is_pinned())
    on = onloader(model)
    for i in tqdm(range(len(get_blocks(model))), desc="dense pass", unit="block", disable=not progress, leave=False):
        block = on.block(i)
        forward = lambda: run_block(block, X, kwargs[i], Y, batch_size)  # noqa: E731
        stats = None
        if need is not None:
            stats = gather_stats(block, block_linears(model, block), need, forward)
            if sharded:
                distributed.all_reduce_stats(stats)
            check_stats(f"{get_arch(model).blocks}.{i}", stats)
        yield i, block, X, stats
        if need is None:
            forward()
        on.release(i)
        X, Y = Y, X


@no_grad
def block_outputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int | None = None, progress: bool = True):
    """Run the dense model block by block on calibration windows and yield (i, Y_i) for every block: Y_i
    (nsamples, seqlen, hidden) are block i's outputs (the next block's inputs). LoSA's reference outputs.
    Y_i is reused: consume (or copy) it before asking for the next block."""
    X, kwargs = capture_inputs(model, input_ids)
    batch_size = batch_size or auto_batch_size(X.shape[1])
    Y = torch.empty_like(X, pin_memory=X.is_pinned())
    on = onloader(model)
    for i in tqdm(range(len(get_blocks(model))), desc="dense outputs", unit="block", disable=not progress,
                  leave=False):
        run_block(on.block(i), X, kwargs[i], Y, batch_size)
        on.release(i)
        yield i, Y
        X, Y = Y, X


def blocks_sparsity(results: list[dict], before: bool = False) -> dict:
    """`linear_sparsity` from `prune_blocks`' report entries (after pruning, or `before` it): what a lazy
    model, whose blocks are no longer in memory, reports."""
    zeros = sum(r["input_zeros" if before else "zeros"] for r in results)
    total = sum(r["params"] for r in results)
    return {"zeros": zeros, "params": total, "sparsity": zeros / total if total else 0.0}


def linear_sparsity(model: nn.Module) -> dict:
    """Exact-zero counts over all prunable linears of the decoder blocks (algorithms.md §1.3)."""
    zeros = total = 0
    for block in get_blocks(model):
        for lin in block_linears(model, block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return {"zeros": zeros, "params": total, "sparsity": zeros / total if total else 0.0}
