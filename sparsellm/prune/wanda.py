"""Wanda: prune by |W_ij| · ‖X_j‖₂, compared within each output row (Sun et al., "A Simple and Effective
Pruning Approach for Large Language Models", ICLR 2024, §3, Eq. 1; algorithms.md §3). No weight update."""

from __future__ import annotations


from ..lazy import lazy_import
from ..registry import register
from .masks import NM, nm_mask, row_mask

torch = lazy_import("torch")


def scores(weight: torch.Tensor, stats) -> torch.Tensor:
    """Wanda scores (C_out, C_in): |W| times the L2 norm of each input feature over all calibration tokens."""
    return weight.abs() * stats.sq_norm.sqrt().reshape(1, -1)


@register("pruner", "wanda", needs="norm")
def prune(weight: torch.Tensor, stats, sparsity: float, nm: NM | None, **_) -> torch.Tensor:
    """Zero floor(C_in · sparsity) lowest-score entries per row, or M−N per group of M inputs."""
    score = scores(weight, stats)
    mask = nm_mask(score, nm) if nm else row_mask(score, sparsity)
    return weight.masked_fill(mask, 0.0)
