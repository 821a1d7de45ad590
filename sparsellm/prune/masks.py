"""Mask selection shared by the pruners: sparsity patterns, N:M groups, per-row and per-layer ranking.

A mask here is a bool tensor of the weight's shape (C_out, C_in) that is True where a weight is *pruned*.
N:M follows NVIDIA's convention: at most N non-zeros in every group of M consecutive weights along the
input dimension (2:4 keeps 2 of every 4), so its sparsity is 1 − N/M (algorithms.md §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

ALREADY_SPARSE = 0.01
"""A weight (or model) with at least this fraction of exact zeros counts as already pruned: its zeros are
kept as part of every mask. Below it, zeros are incidental values of a dense model (SmolLM2-135M de-quantized
from Q4_1 has 0.03% exact zeros, at most 0.04% in any linear), which SparseGPT treats like any other weight,
as its published algorithm does (so dense results are unchanged)."""


@dataclass(frozen=True)
class NM:
    """An N:M pattern: keep `n` of every `m` consecutive input weights."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(sparsity_type: str) -> NM | None:
    """"unstructured" -> None; "2:4", "4:8", "N:M" -> NM(n, m). Raises UsageError when malformed or n >= m."""
    if sparsity_type == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity_type or "")
    if not match:
        raise UsageError(f"malformed sparsity type {sparsity_type!r}: use 'unstructured' or N:M such as 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise UsageError(f"impossible N:M pattern {n}:{m}: need 1 <= N < M (keep N of every M weights)")
    return NM(n, m)


def check_sparsity(sparsity: float) -> float:
    """Raise UsageError unless 0 <= sparsity < 1."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise UsageError(f"sparsity ratio must be in [0, 1), got {sparsity}")
    return float(sparsity)


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Prune the M−N lowest scores in every group of M consecutive columns. score: (C_out, C_in),
    C_in divisible by M. Raises UsageError otherwise."""
    rows, cols = score.shape
    if cols % nm.m:
        raise UsageError(f"in_features {cols} is not divisible by M = {nm.m} for the {nm} pattern")
    groups = score.reshape(rows, cols // nm.m, nm.m)
    idx = torch.topk(groups, nm.m - nm.n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(C_in · sparsity) lowest scores of every output row (stable sort, Wanda §3)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(numel · sparsity) lowest scores of the whole matrix (magnitude §2)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        idx = torch.sort(score.flatten(), stable=True).indices[:k]
        mask[idx] = True
    return mask.reshape(score.shape)


def existing_zeros(weight: torch.Tensor) -> torch.Tensor | None:
    """The exact zeros of weight (C_out, C_in) as a mask (True = pruned) when they are at least
    ALREADY_SPARSE of it, else None: the input was already pruned, and these entries must stay zero."""
    zeros = weight == 0
    return zeros if zeros.sum() >= ALREADY_SPARSE * weight.numel() and zeros.any() else None
