"""One decoder block's work, shared by both engines (`engine.py`, `single_pass.py`): run it over the
calibration micro-batches, gather its linears' input statistics with forward hooks, prune its linears (those
that share an input at once, when the pruner has a group form), and build its report entry."""

from __future__ import annotations

import logging
import time

from .checks import check_tensor
from .lazy import lazy_import
from .models import block_linears, get_arch
from .prune import LayerStats

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

log = logging.getLogger("sparsellm")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, X: torch.Tensor, kwargs: dict, out: torch.Tensor, batch_size: int = 1,
              compare: bool = False) -> tuple[float, float]:
    """out[b] = block(X[b]) over micro-batches. With `compare`, out holds the reference outputs on entry
    and the function returns (Σ‖ref − new‖², Σ‖ref‖²) before overwriting them. Micro-batches of X held
    off the block's device (pinned CPU memory) are moved there and back."""
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    device = next(block.parameters()).device
    num = den = 0.0
    for b in range(0, X.shape[0], batch_size):
        y = _first(block(X[b : b + batch_size].to(device, non_blocking=True), *args, **kw))
        if compare:
            ref = out[b : b + batch_size].to(device).float()
            num += float(((ref - y.float()) ** 2).sum())
            den += float((ref ** 2).sum())
        out[b : b + batch_size] = y.to(out.device)
    return num, den


def gather_stats(block, linears: dict, need: str, forward) -> dict:
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


def prune_block(model, i, block, pruner, stats, rate, nm, options, t0, replay=None) -> dict:
    """Prune every linear of block i at `rate` (or `nm`), then `replay()` the block if given, which returns
    (Σ‖ref − new‖², Σ‖ref‖²) for the relative reconstruction error. Returns the block's report entry."""
    modules, refilled = prune_linears(model, i, block_linears(model, block), pruner, stats, rate, nm, options)
    err = None
    if replay is not None:
        num, den = replay()
        err = (num / den) ** 0.5 if den > 0 else 0.0
    return block_entry(model, i, block, modules, refilled, err, t0)


def block_entry(model, i, block, modules: dict, refilled: int, err, t0) -> dict:
    """Block i's report entry from its linears' entries (`prune_linears`) and its local error `err`."""
    linears = block_linears(model, block)
    total = sum(lin.weight.numel() for lin in linears.values())
    target = sum(modules[n]["target"] * lin.weight.numel() for n, lin in linears.items()) / total
    zeros = sum(m["measured"] * linears[n].weight.numel() for n, m in modules.items())
    zeros_before = sum(round(m["input"] * linears[n].weight.numel()) for n, m in modules.items())
    return {"block": i, "target": target, "measured": zeros / total, "rel_error": err, "cum_error": None,
            "seconds": time.perf_counter() - t0, "modules": modules, "refilled": refilled, "params": total,
            "zeros": round(zeros), "input_zeros": zeros_before}


def prune_linears(model, i, linears: dict, pruner, stats: dict | None, rate, nm, options: dict) -> tuple[dict, int]:
    """Prune the linears {name: nn.Linear} of block i (all of them or a subset) in place at `rate` (a float
    or {name: rate}; with `nm`, its sparsity), `stats` {name: LayerStats} or None (popped as they are used).
    Linears that share one LayerStats (q/k/v, gate/up: `gather_stats`) go through the pruner's `group` form
    at once when it has one (SparseGPT: one stacked OBS), else one by one. Returns ({name: {"target",
    "measured", "input"}} in `linears`' order, input is the fraction of zeros before pruning; and the count
    of those zeros that are not zero after it). Raises NonFiniteError naming the linear (weight or result)."""
    prefix, groups, modules, refilled = f"{get_arch(model).blocks}.{i}", {}, {}, 0
    for name in linears:
        shared = pruner.group is not None and stats is not None and stats.get(name) is not None
        groups.setdefault(id(stats[name]) if shared else name, []).append(name)
    for name, lin in linears.items():
        check_tensor(lin.weight.data, f"{prefix}.{name}", "weight")
        r = (rate[name] if isinstance(rate, dict) else rate) if nm is None else nm.sparsity
        modules[name] = {"target": r, "measured": None, "input": float((lin.weight == 0).sum()) / lin.weight.numel()}
    for names in groups.values():
        st = [stats and stats.pop(n) for n in names][-1]  # popped: freed when used
        todo = [n for n in names if modules[n]["target"] > 0 or nm is not None]
        zero = {n: linears[n].weight.data == 0 for n in todo if modules[n]["input"]}
        if len(todo) > 1:  # the weights as they are (read only); group converts them to fp32
            new = pruner.group([linears[n].weight.data for n in todo], st, [modules[n]["target"] for n in todo],
                               nm, **options)
        else:
            new = [pruner.fn(linears[n].weight.data.float(), st, modules[n]["target"], nm, **options) for n in todo]
        for name, w in zip(todo, new):
            check_tensor(w, f"{prefix}.{name}", f"the {pruner.name}-pruned weight")
            W = linears[name].weight.data
            W.copy_(w.to(W.dtype))
            refilled += int((zero[name] & (W != 0)).sum()) if name in zero else 0
        del new
    for name, lin in linears.items():
        modules[name]["measured"] = float((lin.weight == 0).sum()) / lin.weight.numel()
    return modules, refilled


def log_block(res: dict) -> dict:
    def fmt(e, none="-"):
        return none if e is None else f"{e:.4e}"

    log.info("block %3d  target %.4f  measured %.4f  rel_error %s  cum_error %s  %.2fs", res["block"],
             res["target"], res["measured"], fmt(res["rel_error"]), fmt(res["cum_error"], "off"), res["seconds"])
    return res
