"""Layer-wise sparsity allocation: one rate per decoder block whose mean is the target S.

Every allocator is one file that registers, under kind "allocator", a config dataclass with only its own
fields and one function

    rates, info = rates_for_model(model, calib_ids, target, config, prune_method=..., batch_size=..., progress=...)

`uniform`, `atp` (fixed β) and `file` read only the model's depth (`calib_ids` may be None), `alphapruning`
only the weights; `owl`, `rmi`, `dlp`, `lsa` and `atp_dlp` (`needs="data"`) walk the dense model over the
calibration windows first. DLP, LSA and AlphaPruning share one form (`minmax.py`). `resolve_allocation` runs
the chosen one and checks its rates. ATP's search for β is `atp_search.py`. Adding an allocator is one
file plus one import line below.
"""

from __future__ import annotations

import time

from ..errors import UsageError


def check_rates(rates: list[float], num_blocks: int, target: float, tol: float = 1e-6) -> list[float]:
    """Validate a rate vector: `num_blocks` entries, each in [0, 1), mean within `tol` of `target`.
    Raises UsageError."""
    rates = [float(r) for r in rates]
    if num_blocks < 1:
        raise UsageError("the model has no decoder blocks")
    if len(rates) != num_blocks:
        raise UsageError(f"allocation has {len(rates)} rates for {num_blocks} decoder blocks")
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise UsageError(f"allocated rates must be in [0, 1); got {bad[:3]}")
    mean = sum(rates) / num_blocks
    if abs(mean - target) > tol:
        raise UsageError(f"allocated rates have mean {mean:.6f}, not the target {target:.6f}")
    return rates


def resolve_allocation(model, config, calib_ids=None, progress: bool = True, tokenizer=None) -> tuple[list, dict]:
    """Per-block rates for a `PruneConfig`'s allocation, and the report entry describing them.

    calib_ids: (nsamples, seqlen) calibration windows; only allocators with `needs="data"` read them.
    tokenizer: for allocators that score text (`search`: held-out C4 perplexity).
    Returns (rates, info): rates[i] is a float, or for OWL's layer granularity a dict {linear name: rate};
    info has the allocation's name, its own settings and statistics, the per-block rates (parameter-weighted
    for dicts), `layer_rates` for dicts, and `seconds`. Raises UsageError for invalid rates."""
    from ..models import block_linears, get_blocks
    from ..registry import get

    config.validate()  # fills the chosen methods' default configs (idempotent)
    t0 = time.perf_counter()
    blocks = get_blocks(model)
    method = get("allocator", config.allocation_name)
    rates, extra = method.fn(model, calib_ids, config.sparsity_ratio, config.allocator,
                             prune_method=config.prune_method, batch_size=config.calibration.batch_size,
                             progress=progress, tokenizer=tokenizer)

    def block_rate(block, rate) -> float:
        if not isinstance(rate, dict):
            return float(rate)
        linears = block_linears(model, block)
        return sum(rate[n] * lin.weight.numel() for n, lin in linears.items()) / sum(
            lin.weight.numel() for lin in linears.values())

    block_rates = [block_rate(b, r) for b, r in zip(blocks, rates)]
    info = {"name": config.allocation, **extra, "rates": block_rates}
    if any(isinstance(r, dict) for r in rates):
        check_rates(block_rates, len(blocks), config.sparsity_ratio, tol=1e-4)
        info["layer_rates"] = rates
    info["seconds"] = time.perf_counter() - t0
    return rates, info


from . import uniform  # noqa: E402, I001  (each import registers an allocator, in this order)
from . import atp  # noqa: E402
from . import owl  # noqa: E402
from . import rmi  # noqa: E402
from . import dlp  # noqa: E402
from . import alphapruning  # noqa: E402
from . import lsa  # noqa: E402
from . import atp_dlp  # noqa: E402
from . import from_file  # noqa: E402
from . import search  # noqa: E402

__all__ = ["check_rates", "resolve_allocation", "atp", "owl", "rmi", "dlp", "alphapruning", "lsa", "atp_dlp",
           "uniform", "from_file", "search"]
