"""ATP: layer-wise sparsity as an increasing arithmetic progression whose mean is the target
(Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
Perspective", ICML 2025, §3.3, Eq. 9; algorithms.md §7).

    s_i = S − β(L−1)/2 + β(i−1),  i = 1..L        (mean exactly S, rising with depth)
    0 <= β <= β_max = min(2S/(L−1), 2(1−S)/(L−1))  (keeps s_1 >= 0 and s_L <= 1)

β is the common difference: given here (`--atp_beta`), or chosen by the search in `atp_search.py`
(paper grid step 0.002).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..registry import register


@dataclass
class ATPConfig:
    """ATP's common difference β (0: uniform)."""

    atp_beta: float = setting(0.0, "ATP's common difference β: block i gets S − β(L−1)/2 + β·i")

    def validate(self, target: float) -> "ATPConfig":
        if not self.atp_beta >= 0:
            raise UsageError(f"ATP common difference β must be >= 0, got {self.atp_beta}")
        return self


def beta_max(num_blocks: int, target: float) -> float:
    """Largest common difference that keeps every rate in [0, 1]. 0 for a single block."""
    if num_blocks < 2:
        return 0.0
    return min(2 * target, 2 * (1 - target)) / (num_blocks - 1)


def allocate(num_blocks: int, target: float, atp_beta: float = 0.0, **_) -> list[float]:
    """ATP rates for `num_blocks` blocks at mean sparsity `target` with common difference `atp_beta`.
    Raises UsageError if β is outside [0, β_max] or a rate would reach 1."""
    bmax = beta_max(num_blocks, target)
    if not 0.0 <= atp_beta <= bmax + 1e-12:
        raise UsageError(f"ATP common difference β = {atp_beta} is outside [0, {bmax:.6f}{')' if target >= 0.5 else ']'} for "
                         f"{num_blocks} blocks at sparsity {target}")
    start = target - atp_beta * (num_blocks - 1) / 2
    rates = [min(max(start + atp_beta * i, 0.0), 1.0) for i in range(num_blocks)]
    if rates[-1] >= 1.0 - 1e-9:  # within rounding of 1: row masks would prune all but one weight per row
        raise UsageError(f"ATP β = {atp_beta} gives the last block sparsity 1; at sparsity {target} β must be "
                         f"below {bmax:.6f}")
    return rates


@register("allocator", "atp", ATPConfig)
def rates_for_model(model, calib_ids, target: float, config: ATPConfig, **_):
    """ATP rates for `model`'s decoder blocks; info records β."""
    from ..models import get_blocks
    from . import check_rates

    L = len(get_blocks(model))
    return check_rates(allocate(L, target, config.atp_beta), L, target), {"atp_beta": config.atp_beta}
