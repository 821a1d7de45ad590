"""Layer-wise sparsity allocation: one rate per decoder block whose mean is the target.

Every allocator has the shape `rates = allocate(num_blocks, target, **what_it_needs) -> list[float]`.
Uniform, ATP (fixed β) and user files need nothing else. OWL and RMI need statistics of the dense model
(outlier ratios `owl_lod`, a block CKA matrix `rmi_cka`), which `sparsellm.api.resolve_allocation`
gathers in a dense pre-pass and hands to the same function.
"""

from __future__ import annotations

from ..errors import UsageError
from . import atp, owl, rmi, uniform
from .from_file import read_rates

ALLOCATORS = {"uniform": uniform.allocate, "atp": atp.allocate, "owl": owl.allocate, "rmi": rmi.allocate}


def allocate(name: str, num_blocks: int, target: float, **options) -> list[float]:
    """Rates for `num_blocks` blocks from allocator `name` ("uniform", "atp" or "file:PATH"), validated by
    `check_rates` (a user file whose mean misses the target is accepted only with mean_tolerance=None)."""
    if name.startswith("file:"):
        rates = read_rates(name[len("file:"):], num_blocks)
        tol = options.get("mean_tolerance", 1e-6)
        return check_rates(rates, num_blocks, target, tol=float("inf") if tol is None else tol)
    if name not in ALLOCATORS:
        raise UsageError(f"unknown allocation {name!r}; choose from {', '.join(ALLOCATORS)} or file:PATH")
    return check_rates(ALLOCATORS[name](num_blocks, target, **options), num_blocks, target)


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
