"""The single-pass engine (`--engine single`): every operation of a decoder block runs once.

The block engine (`engine.py`) runs each block twice over the calibration windows: once with hooks for
the statistics, and once more with the pruned weights for the next block's inputs. Here each block's
forward runs once, in stages at its sublayer groups (the linears that read one tensor, `Arch.groups`;
LLaMA: q/k/v → o → gate/up → down):

    for block i:
        start the block's forward on every micro-batch of X_i; each stops at its first group's first linear
        for each group, in the order the forward reaches it:
            the group's input statistics were accumulated (fp32) as the micro-batches arrived
            prune the group's linears
            every micro-batch goes on, through the pruned group, to the next group's first linear
        the finished forwards are X_{i+1}

So each group is pruned from the statistics of the inputs it actually sees, with the groups before it in
the block already pruned ("true sequential", in GPTQ's terms), and the pruned block's outputs come out of
the same forward: no replay. Against the block engine only the statistics of the groups after the first
(o, gate/up, down) differ: their inputs now come through pruned sublayers.

The forward is the model's own `block.forward`. Each micro-batch runs in its own greenlet (a coroutine
in the calling thread) and waits in a forward pre-hook of its next group's first linear; micro-batches run
one after another in a fixed order, so the result is deterministic. Memory: every micro-batch's live
tensors at its stop, about tokens · (8 · hidden + 2 · the widest linear input) values in the model's dtype
with headroom (`live_bytes`). When that is more than half the free memory of the device, the engine
recomputes instead (mode "recompute", logged): for each group every micro-batch re-runs the block's prefix up to it, then one more forward gives the
outputs. The statistics and the pruned weights are the same; the forwards cost about G/2 + 1 passes
instead of one (G groups), with one micro-batch's memory.
"""

from __future__ import annotations

import logging
import threading

from . import distributed
from .block_work import _first, block_entry, prune_linears, run_block
from .checks import check_stats
from .errors import UsageError
from .lazy import lazy_import
from .models import block_linears, get_arch
from .models.sharded import trim_heap
from .prune import LayerStats

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")
_tls = threading.local()  # the micro-batch (`_Window`) whose forward runs now, in this thread


class _Stop(Exception):
    """Unwinds a micro-batch's forward: at a stop in recompute mode, or after an error elsewhere."""


class _Window:
    """One micro-batch's forward through a block, run in its own greenlet (a coroutine with its own stack, in
    the calling thread) and stopped at each group that is not pruned yet. `inputs`: {group: (data pointer,
    shape) of the tensor its first linear read}, to check that the group's other linears read the same one.

    Greenlets, not threads: torch ops run several times slower in a second OS thread (each thread has its
    own OpenMP team and CUDA state). With one thread per micro-batch the engine took 9.3–9.9 s per
    LLaMA-2-7B block on an H200 against the block engine's 0.9 s (BENCHMARKS.md §9), and a 64 × 256
    matrix product loop ran 3× slower in a thread than in the main one on this 2-core CPU."""

    def __init__(self, run=None):
        self.run, self.at, self.error, self.abort = run, None, None, False
        self.inputs = {}
        if run is not None:
            from greenlet import greenlet  # a dependency; imported here so the block engine works without it

            self._g = greenlet(self._main)
        else:
            self._g = None

    def _main(self):
        try:
            if not self.abort:
                self.run()
        except _Stop:
            pass
        except BaseException as e:  # raised again in the caller by `step`
            self.error = e
        finally:
            self.at, self.inputs = None, {}

    def step(self):
        """Let the forward run to its next stop (called by the engine). Returns the index of the group it
        stopped at, or None when the forward has finished; raises what the forward raised. Grad mode is per
        thread, shared by the greenlets: it is turned off here, around the switch, so every window's
        forward runs without autograd and the caller's mode is restored each time."""
        outer = getattr(_tls, "window", None)
        _tls.window = self
        try:
            with torch.no_grad():
                self._g.switch()
        finally:
            _tls.window = outer
        if self.error is not None:
            raise self.error
        return self.at

    def stop(self, g: int):
        """In the forward's greenlet: wait at group g until the engine lets it go on."""
        self.at = g
        self._g.parent.switch()
        if self.abort:
            raise _Stop

    def close(self):
        """Unwind a forward that is still waiting (after an error). Never raises: an error while unwinding is
        logged, so the error that stopped the engine is the one the caller sees, and every window is closed."""
        if self._g is not None and self._g and not self._g.dead:  # started, suspended at a stop
            self.abort = True
            self.error = None
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001
                log.debug("a micro-batch raised while it was unwound: %r", e)


class _Recompute(_Window):
    """Recompute mode: the forward runs in the calling thread and is abandoned at the stop."""

    def stop(self, g: int):
        self.at = g
        raise _Stop


def live_bytes(model, block, tokens: int, dtype) -> int:
    """Bytes held by every micro-batch's forward at its stops, for `tokens` calibration tokens: 8 · hidden +
    2 · the widest linear input values per token. The tensors alive at a stop (residual, normed input,
    rotated q/k, v, attention output, MLP intermediate) are about 4 · hidden + the widest input; the rest is
    headroom for the allocator. Measured on SmolLM2-135M (hidden 576, intermediate 1536), 64 × 512 windows,
    a peak RSS of 1.8 GB against the block engine's 1.3 GB (BENCHMARKS.md §10a; 2.9 GB when each micro-batch
    ran in its own thread, with its own glibc arena); this formula gives 1.0 GB for those windows."""
    linears = block_linears(model, block).values()
    widest = max(lin.in_features for lin in linears)
    hidden = getattr(model.config, "hidden_size", None) or widest
    return tokens * (8 * hidden + 2 * widest) * torch.empty((), dtype=dtype).element_size()


def choose_mode(model, block, X) -> str:
    """"single" when every micro-batch's live tensors (`live_bytes`) fit in half the free memory of the
    block's device (the CPU's MemAvailable, or CUDA's free memory), else "recompute"."""
    from .devices import free_bytes
    from .models.load import free_memory

    device = next(block.parameters()).device
    free = free_bytes(device) if device.type == "cuda" else free_memory()
    need = live_bytes(model, block, X.shape[0] * X.shape[1], X.dtype)
    if need <= 0.5 * free:
        return "single"
    log.info("single-pass engine: the micro-batches' live tensors (%.2f GiB) do not fit in half the free memory "
             "(%.2f GiB): recomputing each group's inputs instead", need / 2**30, free / 2**30)
    return "recompute"


def forward_in_stages(model, block, X, kwargs: dict, Y, batch_size: int, need: str, on_group,
                      mode: str = "single") -> None:
    """Y[b] = block(X[b]) for every micro-batch, stopping at each group of linears (`Arch.groups`) until
    `on_group(names, stats)` has been called for it: names are the group's linear names (in the block),
    stats the LayerStats ("norm" or "hessian") of their common input over every window, gathered with the
    groups before it already changed by their own `on_group` (pruned). X, Y: (nsamples, seqlen, hidden).
    mode "single" runs every forward once (one greenlet per micro-batch); "recompute" re-runs each
    micro-batch's prefix for every group. Raises UsageError if a group's linears do not read one tensor or
    the micro-batches reach different groups (an architecture entry that does not fit the model)."""
    linears = block_linears(model, block)
    groups = [tuple(n for n in g if n in linears) for g in get_arch(model).groups]
    groups = [g for g in groups if g]
    group_of = {linears[n]: gi for gi, g in enumerate(groups) for n in g}
    name_of = {mod: n for n, mod in linears.items()}
    stats = [LayerStats() for _ in groups]
    done = set()

    def hook(mod, args):
        w, g, x = _tls.window, group_of[mod], args[0]
        seen = w.inputs.setdefault(g, (x.data_ptr(), x.shape))
        if seen != (x.data_ptr(), x.shape):
            raise UsageError(f"{name_of[mod]} does not read the same tensor as {groups[g][0]}: the architecture "
                             "table's groups do not fit this model; use --engine block")
        if g not in done:
            stats[g].add(x, need)
            w.stop(g)

    kw = dict(kwargs)
    args = kw.pop("_args", ())
    device = next(block.parameters()).device
    spans = [(b, min(b + batch_size, X.shape[0])) for b in range(0, X.shape[0], batch_size)]

    def run(b, e):
        def go():
            Y[b:e] = _first(block(X[b:e].to(device, non_blocking=True), *args, **dict(kw))).to(Y.device)
        return go

    def release(g):
        on_group(groups[g], stats[g])
        stats[g] = None
        done.add(g)

    handles = [mod.register_forward_pre_hook(hook) for mod in group_of]
    try:
        if mode == "single":
            _single(spans, run, release)
        else:
            _recompute(spans, run, release)
    finally:
        for h in handles:
            h.remove()
    if len(done) != len(groups):
        raise UsageError(f"the forward reached {len(done)} of the {len(groups)} groups of linears; use --engine block")


def _same_stop(stops: list):
    if any(s != stops[0] for s in stops):
        raise UsageError("the calibration micro-batches stopped at different groups of linears; use --engine block")
    return stops[0]


def _single(spans, run, release) -> None:
    windows = [_Window(run(b, e)) for b, e in spans]
    try:
        g = _same_stop([w.step() for w in windows])
        while g is not None:
            release(g)
            g = _same_stop([w.step() for w in windows])
    finally:
        for w in windows:
            w.close()


def _recompute(spans, run, release) -> None:
    w = _Recompute()
    outer = getattr(_tls, "window", None)
    _tls.window = w
    try:
        while True:
            stops = []
            for b, e in spans:
                w.at, w.inputs = None, {}
                try:
                    run(b, e)()  # finishes, writing Y, once every group is done
                except _Stop:
                    pass
                stops.append(w.at)
            g = _same_stop(stops)
            if g is None:
                return
            release(g)
    finally:
        _tls.window = outer


def prune_block(model, i: int, block, pruner, rate, nm, options: dict, X, kwargs: dict, Y, batch_size: int,
                sharded: bool, diag: tuple[int, int], add_up, t0, mode: str = "auto") -> dict:
    """Prune block i in one pass and return its report entry (as `block_work.prune_block`'s): Y = the pruned
    block's outputs on X, each group pruned by `block_work.prune_linears` from the statistics of its actual
    inputs, summed over the processes when `sharded` (`add_up` sums the error terms). diag = (k, kl): with k
    diagnostic windows in all, this process's first kl; the local error is then measured on them, with one
    dense forward of those (else it is None)."""
    k, kl = diag
    linears = block_linears(model, block)
    prefix = f"{get_arch(model).blocks}.{i}"
    ref = None
    if k:
        ref = torch.empty_like(X[:kl])
        run_block(block, X[:kl], kwargs, ref, batch_size)  # the dense block on the same inputs
    modules, refilled = {}, 0

    def on_group(names, st):
        nonlocal refilled
        shared = {n: st for n in names}
        if sharded:
            distributed.all_reduce_stats(shared)
        check_stats(prefix, shared)
        m, r = prune_linears(model, i, {n: linears[n] for n in names}, pruner, shared, rate, nm, options)
        modules.update(m)
        refilled += r

    if mode == "auto":
        mode = choose_mode(model, block, X)
    forward_in_stages(model, block, X, kwargs, Y, batch_size, pruner.needs, on_group, mode)
    trim_heap()  # give the freed heap back before the next block
    err = None
    if k:
        r = ref.float()
        num, den = add_up(float(((r - Y[:kl].to(r.device).float()) ** 2).sum()), float((r ** 2).sum()))
        err = (num / den) ** 0.5 if den > 0 else 0.0
    return block_entry(model, i, block, {n: modules[n] for n in linears}, refilled, err, t0)
