"""Data-parallel fine-tuning: several processes (one per GPU) started by `accelerate launch` or `torchrun`
train one set of adapters (`train.train`), and LoSA's merge / RMI / re-prune cycle runs on all of them.

    every process: the same examples, the same global micro-batches (ft_batch_size rows, in the same order)
        its rows of each micro-batch (`row_share`: contiguous, balanced; none when there are fewer rows
        than processes)  ─► loss = Σ token losses / the micro-batch's label tokens over all processes
        every grad_accum micro-batches: gradients summed over the processes (`sync_gradients`, one
        all-reduce per dtype), then the same clipping and AdamW step everywhere

The objective is the single-process one exactly: one process takes the mean token loss of each micro-batch
and averages those over the step; here each process's share of a micro-batch is divided by the token count
of the whole micro-batch (every process holds every example, so it is known without communication) and the
shares are added. Every process therefore holds the same adapters after every step: the one-process run's up
to the order of float sums. ft_batch_size and grad_accum are global settings (the same optimiser steps as one
process); with more processes, a larger --ft_batch_size keeps every GPU busy.

The rest of a run needs no code of its own: pruning and the pruner statistics behind LoSA's re-prune go through
the engine, which runs each process's share of the calibration windows and sums the statistics
(`sparsellm.distributed`), so every process prunes to the same masks; RMI's CKA, the dense block outputs and
the evaluations run on all windows on every process. Only the main process writes files (checkpoints,
outputs); the others wait for it (`distributed.barrier`).

With one process every function here is a no-op: the run is exactly the single-process one.
"""

from __future__ import annotations

from .. import distributed
from ..lazy import lazy_import

torch = lazy_import("torch")


def row_share(n: int, rank: int | None = None, size: int | None = None) -> slice:
    """This process's rows of a micro-batch of `n` rows: contiguous, the first n % size processes one more;
    empty when this process's turn is past n (n < size). The whole batch without a process group."""
    if rank is None or size is None:
        rank, size = distributed.world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def token_loss(logits, labels, count: int):
    """The causal LM loss of `logits` (B, T, V) against `labels` (B, T; -100: no loss), next-token shifted
    as transformers' own, summed over the tokens and divided by `count` (the label tokens of the whole
    micro-batch, over all processes): a float32 scalar. Raises nothing; 0 rows give 0."""
    V = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return ce / max(1, count)


def label_tokens(labels) -> int:
    """The tokens of `labels` (B, T) that carry a loss after the next-token shift."""
    return int((labels[:, 1:] != -100).sum())


def check_same_examples(examples) -> None:
    """UsageError unless every process holds the same fine-tuning examples (their number, lengths and a
    position-weighted token checksum of input_ids and labels). No-op without a process group."""
    if distributed.world()[1] == 1:
        return
    total, lengths = 0, 0
    for k, (x, y) in enumerate(examples, 1):
        pos = torch.arange(1, x.numel() + 1, dtype=torch.int64)
        total += k * int((x.long().cpu() * pos).sum()) + 7 * k * int((y.long().cpu() * pos[:y.numel()]).sum())
        lengths += k * x.numel()
    distributed.check_same([len(examples), lengths, total % (1 << 62)],
                           "the processes hold different fine-tuning examples (the same --data, --ft_nsamples, "
                           "--ft_seqlen and --seed on every process are required)")


def sync_gradients(params, *scalars: float) -> tuple:
    """Sum the gradients of `params` over the processes, in place (a missing gradient, from a process that
    ran no rows, counts as zeros), and return the sums of `scalars`. One all-reduce per (device, dtype)
    group of parameters. Returns `scalars` unchanged without a process group."""
    if distributed.world()[1] == 1:
        return scalars
    groups: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        distributed._reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return distributed.all_reduce_sums(*scalars)


def main_writes(write) -> None:
    """Call `write()` on the main process only, then wait for it on every process."""
    if distributed.is_main():
        write()
    distributed.barrier()


__all__ = ["row_share", "token_loss", "label_tokens", "check_same_examples", "sync_gradients", "main_writes"]
