"""LoSA's schedules (Huang et al., ICLR 2025; algorithms.md §8.3–8.4): the cubic sparsity ramp and the
per-block LoRA ranks from reconstruction error."""

from __future__ import annotations

from ..errors import UsageError


def cubic_schedule(target: float, steps: int) -> list[float]:
    """s_t = S − S(1 − t/T)³ for t = 1..T (S = 0.7, T = 5: .342, .549, .655, .694, .700). Raises UsageError."""
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if not 0 <= target < 1:
        raise UsageError(f"sparsity must be in [0, 1), got {target}")
    return [target - target * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def allocate_ranks(errors: list[float], mean_rank: float, r_max: int = 16) -> list[int]:
    """Ranks proportional to each block's (normalised, cumulative) reconstruction error, with total
    R = round(mean_rank · L): r_i = clip(round(e_i / Σe · R), 1, r_max), then the sum is fixed to R by
    taking one from each of the lowest-error blocks in turn (if over) or giving one to each of the
    highest-error blocks in turn (if under), within [1, r_max]. Equal (or all-zero) errors give equal ranks. Raises UsageError for bad settings."""
    L = len(errors)
    if L == 0:
        raise UsageError("no blocks")
    if r_max < 1 or not 1 <= mean_rank <= r_max:
        raise UsageError(f"mean rank {mean_rank} must be in [1, r_max = {r_max}]")
    if any(not e >= 0 for e in errors):
        raise UsageError("reconstruction errors must be finite and >= 0")
    R = round(mean_rank * L)
    total = sum(errors)
    share = [e / total for e in errors] if total > 0 else [1.0 / L] * L
    ranks = [min(max(round(s * R), 1), r_max) for s in share]
    order = sorted(range(L), key=lambda i: (errors[i], i))  # lowest error first
    k = 0
    while sum(ranks) > R:  # one off each of the lowest-error blocks in turn
        i = order[k % L]
        if ranks[i] > 1:
            ranks[i] -= 1
        k += 1
    k = 0
    while sum(ranks) < R:  # one onto each of the highest-error blocks in turn
        i = order[L - 1 - k % L]
        if ranks[i] < r_max:
            ranks[i] += 1
        k += 1
    return ranks
