"""Several processes (GPUs) pruning one model: `torchrun --nproc_per_node K -m sparsellm prune ...`.

Every process loads the same model and draws the same calibration windows; each runs only its share of the
windows (`shard_windows`: contiguous, balanced) through the current block. The statistics the pruners read
(`prune.LayerStats`) and the sums behind the reconstruction errors are added over the processes
(`all_reduce_stats`, `all_reduce_sums`) before anyone uses them, so every process prunes the block from the
same numbers and holds the same pruned weights: the single-process result up to the order of float sums.

Fine-tuning under the same launch (`accelerate launch` or torchrun) is data parallel: each process trains on
its rows of every micro-batch and the gradients are summed (`adapt/parallel.py`), while its prunes go through
the functions here; `barrier` and `broadcast_` serve it.

Without an initialised process group (a plain run, or a launch with one process) every function here is a
no-op that touches no `torch.distributed` call: `world()` is (0, 1).
"""

from __future__ import annotations

import logging
import os

from .errors import UsageError
from .lazy import lazy_import

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group; (0, 1) when there is none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes the outputs, logs and progress bars (rank 0, or a plain run)."""
    return world()[0] == 0


def launched() -> bool:
    """Whether the environment says this process is one of several started by torchrun / accelerate."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto"):
    """Join the process group a torchrun / `accelerate launch` launch describes (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and return this process's compute device (`devices.resolve_device`
    of `device`). A CUDA run (auto with a GPU, cuda, or cuda:LOCAL_RANK) uses cuda:LOCAL_RANK and NCCL; a
    CPU run uses gloo. Not launched (or launched with one process): only resolves `device`. Raises
    UsageError for missing launch variables, or cuda:N other than this process's cuda:LOCAL_RANK."""
    from .devices import check_device_spec, resolve_device

    check_device_spec(device)
    if not launched():
        return resolve_device(device)
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise UsageError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                         "not set: start the run with torchrun or accelerate launch")
    local = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and (device != "auto" or torch.cuda.is_available())
    if cuda:
        if ":" in device and int(device.split(":")[1]) != local:
            raise UsageError(f"--device {device}: with several processes each uses cuda:LOCAL_RANK (this one "
                             f"cuda:{local}); give --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)  # resolve_device("auto" / "cuda") now answers cuda:LOCAL_RANK
    resolved = resolve_device(f"cuda:{local}" if cuda else device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, size = world()
    log.info("process %d of %d on %s", rank, size, resolved)
    return resolved


def shard_windows(n: int, rank: int | None = None, size: int | None = None) -> slice:
    """The calibration windows (indices of n) this process runs: a contiguous slice, the first n % size
    processes one window more. Raises UsageError when some process would get none (n < size)."""
    if rank is None or size is None:
        rank, size = world()
    if n < size:
        raise UsageError(f"{n} calibration windows for {size} processes: every process needs at least one "
                         f"(use --nsamples {size} or more, or fewer processes)")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def local_windows(input_ids):
    """(this process's rows of `input_ids`, their slice) after checking that every process holds the same
    windows (`check_same_windows`)."""
    check_same_windows(input_ids)
    part = shard_windows(input_ids.shape[0])
    return input_ids[part], part


def local_prefix(n: int, k: int, shard: slice) -> int:
    """How many of this process's windows (`shard` of n) are among the first k: they are the first ones
    of its share (the diagnostic stream's windows)."""
    return sum(1 for g in range(n)[shard] if g < k)


def _reduce(t):
    """Sum `t` over the processes in place (through the current CUDA device under NCCL)."""
    dist = torch.distributed
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.to("cuda")
        dist.all_reduce(tmp)
        t.copy_(tmp)
    else:
        dist.all_reduce(t)
    return t


def all_reduce_stats(stats: dict) -> dict:
    """Sum every LayerStats of `stats` ({linear name: LayerStats}) over the processes, in place: sq_norm,
    hessian, total (each in its stored dtype) and ntokens. An object shared by several names (q/k/v,
    gate/up) is reduced once. No-op without a process group. Every process must hold the same names, in
    the same order, with the same fields set (each has at least one window: `shard_windows`)."""
    if world()[1] == 1:
        return stats
    unique = list({id(s): s for s in stats.values() if s is not None}.values())
    for s in unique:
        for field in ("sq_norm", "hessian", "total"):
            t = getattr(s, field)
            if t is not None:
                _reduce(t)
    counts = all_reduce_sums(*(s.ntokens for s in unique))
    for s, c in zip(unique, counts):
        s.ntokens = int(c)
    return stats


def all_reduce_sums(*values: float) -> tuple:
    """The sums over the processes of `values` (floats or ints, added in float64); the values themselves
    without a process group."""
    if world()[1] == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return tuple(v.item() for v in _reduce(t))


def barrier() -> None:
    """Wait until every process gets here (after the main process wrote a file the others then read). No-op
    without a process group."""
    if world()[1] > 1:
        torch.distributed.barrier()


def broadcast_(tensors) -> None:
    """Overwrite each tensor of `tensors` with the main process's, in place. No-op without a process group."""
    if world()[1] == 1:
        return
    dist = torch.distributed
    for t in tensors:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            tmp = t.detach().to("cuda")
            dist.broadcast(tmp, 0)
            t.detach().copy_(tmp)
        else:
            dist.broadcast(t.detach(), 0)


def check_same(digest: list[int], message: str) -> None:
    """UsageError(`message`) unless every process passes the same integers `digest` (a shape, a checksum):
    all processes must hold the same data. No-op without a process group."""
    if world()[1] == 1:
        return
    dist = torch.distributed
    low = torch.tensor(digest, dtype=torch.int64)
    high = low.clone()
    if dist.get_backend() == "nccl":
        low, high = low.to("cuda"), high.to("cuda")
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low.cpu(), high.cpu()):
        raise UsageError(message)


def check_same_windows(input_ids) -> None:
    """UsageError unless every process holds the same calibration windows (shape and a position-weighted
    token checksum): each process runs its share of one set of windows. No-op without a process group."""
    if world()[1] == 1:
        return
    ids = input_ids.long().reshape(-1).cpu()
    pos = torch.arange(1, ids.numel() + 1, dtype=torch.int64)
    check_same([*input_ids.shape, int((ids * pos).sum())],  # exact in int64
               "the processes drew different calibration windows (same --calib_dataset, --nsamples, "
               "--seqlen and --seed on every process are required)")
