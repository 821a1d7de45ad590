"""Uniform allocation: every decoder block gets the target sparsity ratio."""

from __future__ import annotations

from ..registry import register


def allocate(num_blocks: int, target: float, **_) -> list[float]:
    """[target] * num_blocks."""
    return [float(target)] * num_blocks


@register("allocator", "uniform")
def rates_for_model(model, calib_ids, target: float, config=None, **_):
    """The target for every decoder block of `model`; no extra info."""
    from ..models import get_blocks

    return allocate(len(get_blocks(model)), target), {}
