"""Magnitude pruning: score |W|, one threshold for the whole matrix; N:M per group of M inputs
(algorithms.md §2; Han et al. 2015, as used as the baseline in Wanda and SparseGPT)."""

from __future__ import annotations


from ..lazy import lazy_import
from ..registry import register
from .masks import NM, layer_mask, nm_mask

torch = lazy_import("torch")


@register("pruner", "magnitude", needs="none")
def prune(weight: torch.Tensor, stats, sparsity: float, nm: NM | None, **_) -> torch.Tensor:
    """Zero the lowest-|W| entries of weight (C_out, C_in): floor(numel · sparsity) of them, or M−N per group."""
    score = weight.abs()
    mask = nm_mask(score, nm) if nm else layer_mask(score, sparsity)
    return weight.masked_fill(mask, 0.0)
