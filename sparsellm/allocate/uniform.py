"""Uniform allocation: every decoder block gets the target sparsity ratio."""

from __future__ import annotations


def allocate(num_blocks: int, target: float, **_) -> list[float]:
    """[target] * num_blocks."""
    return [float(target)] * num_blocks
