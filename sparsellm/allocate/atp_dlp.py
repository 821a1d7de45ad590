"""ATP + DLP: ATP's arithmetic progression as the trend, DLP's per-block deviations around it (a combination
of Huang et al., ICML 2025, §3.3 Eq. 9, whose §5 says the progression composes with other allocators, and
DLP, `dlp.py`; issue 23).

    trend_l = S − β(L−1)/2 + β·l                          ATP (`atp.allocate`), mean S, rising with depth
    dev_l   = 2α · (norm_l − mean(norm)),  norm = min-max normalised DLP block scores U_l, mean 0
    s       = fit_mean(isotonic(trend + dev))              mean exactly S, in [0, 0.99], non-decreasing

`isotonic` is the least-squares non-decreasing fit (pool adjacent violators): it averages neighbouring
blocks whose deviations would reverse ATP's order, so the sum, hence the mean, is unchanged; with
`--atp_dlp_unordered` the deviations are kept as they are. β = 0 is DLP (made monotone), α = 0 is ATP.
β and α are fixed here (defaults untuned: β_max/2 and α = 0.075) or searched jointly by `atp_search.search_joint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import
from ..registry import register
from . import atp, dlp, minmax

np = lazy_import("numpy")


@dataclass
class ATPDLPConfig:
    """β (None: β_max/2), α and whether the rates may leave the depth order."""

    atp_dlp_beta: float | None = setting(None, "ATP+DLP: ATP's common difference β (default when left out: β_max/2)")
    atp_dlp_alpha: float = setting(0.075, "ATP+DLP: DLP's α, the deviations around ATP's trend span 2α")
    atp_dlp_unordered: bool = setting(False, "ATP+DLP: let DLP's deviations break ATP's depth order (default: the "
                                             "rates are kept non-decreasing by pool adjacent violators)")

    def validate(self, target: float) -> "ATPDLPConfig":
        if self.atp_dlp_beta is not None and not (self.atp_dlp_beta >= 0 and math.isfinite(self.atp_dlp_beta)):
            raise UsageError(f"--atp_dlp_beta must be >= 0, got {self.atp_dlp_beta}")
        dlp.check_alpha(self.atp_dlp_alpha, "--atp_dlp_alpha")
        return self


def isotonic(values) -> list[float]:
    """The non-decreasing sequence nearest to `values` in least squares (pool adjacent violators, equal
    weights): every pool is replaced by its mean, so the sum is kept exactly up to rounding."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([float(v), 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            s, n = pools.pop()
            pools[-1][0] += s
            pools[-1][1] += n
    return [s / n for s, n in pools for _ in range(n)]


def allocate(scores, target: float, beta: float | None = None, alpha: float = 0.075,
             monotone: bool = True) -> list[float]:
    """Rates for len(scores) blocks from DLP block scores U (L,), ATP's β (None: β_max/2) and DLP's α: mean
    exactly S, every rate in [0, 0.99], non-decreasing when `monotone`. Raises UsageError for β outside
    [0, β_max] or α outside [0, 0.5)."""
    L = len(scores)
    if beta is None:
        beta = atp.beta_max(L, target) / 2
    trend = np.asarray(atp.allocate(L, target, atp_beta=beta))
    dlp.check_alpha(alpha, "ATP+DLP α")
    norm = minmax.minmax(scores)
    raw = trend + 2 * alpha * (norm - norm.mean())
    if monotone:
        raw = np.asarray(isotonic(raw))
    return minmax.fit_mean(raw, 1.0, target)  # a monotone map of raw: the order survives the clip


@register("allocator", "atp_dlp", ATPDLPConfig, needs="data")
def rates_for_model(model, calib_ids, target: float, config: ATPDLPConfig, *, batch_size=None, progress=True, **_):
    """ATP+DLP rates from one dense pass (DLP's block scores). Returns (rates, info with β, α and U)."""
    from . import check_rates

    scores = dlp.block_scores(model, calib_ids, "mean", batch_size, progress)
    beta = atp.beta_max(len(scores), target) / 2 if config.atp_dlp_beta is None else config.atp_dlp_beta
    rates = allocate(scores, target, beta, config.atp_dlp_alpha, not config.atp_dlp_unordered)
    info = {"atp_dlp_beta": beta, "atp_dlp_alpha": config.atp_dlp_alpha, "atp_dlp_unordered": config.atp_dlp_unordered,
            "block_scores": scores}
    return check_rates(rates, len(rates), target), info
