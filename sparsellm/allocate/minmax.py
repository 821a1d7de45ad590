"""The allocator form that DLP, LSA and AlphaPruning share: min-max normalise one statistic per unit (block or
linear), spread the units over a fixed width, then move them all together until the mean is the target
(allocators-engines-kernels.md, "a useful common structure").

    norm_k = (m_k − min m) / (max m − min m) ∈ [0, 1]           (0 for every unit when max m = min m)
    additive  (DLP, LSA; OWL's form):  s_k = clip(width · norm_k + c,       lo, hi)
    multiplicative (AlphaPruning):     s_k = clip(c · (1 − ε + 2ε · norm_k), lo, hi)
    c is the one number that makes the `weights`-weighted mean of s exactly S.

Both are `fit_mean(a, b, S)`: s_k = clip(a_k + b_k · c) with b_k > 0. Without clipping the additive c is
S − mean(width · norm), which is DLP's `get_dlp_ratios` and LSA's `blk_score` to the last digit, and the
multiplicative c is S · ΣN / Σ N·r, AlphaPruning's `ww_sparsity`. The reference codes do not clip to [0, 1)
(DLP sets s <= 0 to 0.01, breaking its mean); here a clipped unit's excess is moved to the others so that the
mean stays exactly S.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError
from ..lazy import lazy_import

np = lazy_import("numpy")

MAX_RATE = 0.99  # no unit is pruned beyond this: every row keeps at least 1% of its weights


def minmax(values: Sequence[float]) -> "np.ndarray":
    """(K,) float64 min-max normalised `values` in [0, 1]; all zeros when every value is the same (one unit,
    or a flat statistic), so nothing divides by zero. Raises UsageError for non-finite values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise UsageError(f"allocation statistic must be finite numbers; got {v.tolist()[:5]}")
    if v.size == 0 or v.max() == v.min():
        return np.zeros_like(v)
    return (v - v.min()) / (v.max() - v.min())


def fit_mean(a, b, target: float, weights=None, lo: float = 0.0, hi: float = MAX_RATE) -> list[float]:
    """Rates s_k = clip(a_k + b_k · c, lo, hi) (b_k > 0) with the one c whose `weights`-weighted mean (default
    equal) is exactly `target`, found on the piecewise-linear mean between its breakpoints (no iteration).
    Raises UsageError unless lo <= target <= hi, b > 0 and the weights are non-negative with a positive sum."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1))
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not lo <= target <= hi:
        raise UsageError(f"target sparsity {target} is outside the allowed rates [{lo}, {hi}]")
    if a.size == 0:
        return []
    if (b <= 0).any() or not np.isfinite(a).all() or not np.isfinite(b).all():
        raise UsageError("fit_mean needs finite offsets and positive finite slopes")
    if w.shape != a.shape or (w < 0).any() or not w.sum() > 0:
        raise UsageError(f"allocation weights must be {a.size} non-negative numbers with a positive sum")
    w = w / w.sum()
    bps = np.unique(np.concatenate([(lo - a) / b, (hi - a) / b]))  # mean(c) is linear between these
    means = np.clip(a[None, :] + b[None, :] * bps[:, None], lo, hi) @ w  # non-decreasing, lo .. hi
    k = min(max(int(np.searchsorted(means, target, side="right")), 1), len(bps) - 1) if len(bps) > 1 else 0
    if len(bps) == 1:  # every unit has the same breakpoints: the rates are equal for every c
        c = bps[0]
    else:
        span = means[k] - means[k - 1]
        c = bps[k - 1] + ((target - means[k - 1]) * (bps[k] - bps[k - 1]) / span if span > 0 else 0.0)
    s = np.clip(a + b * c, lo, hi)
    s += target - s @ w  # rounding only (below 1e-15): the mean is then S to the last bit that float allows
    return [float(min(max(r, lo), hi)) for r in s]


def recentre(stat: Sequence[float], target: float, width: float, weights=None) -> list[float]:
    """Additive form (DLP §1.2 step 5–7, LSA's `blk_score`): s_k = S + width · (norm_k − mean(norm)) where
    norm = `minmax(stat)`, then clipped to [0, MAX_RATE] with the mean kept exactly S. Sparsity grows with
    the statistic and spans `width` (2α). Raises UsageError for width < 0 or non-finite statistics."""
    if not width >= 0:
        raise UsageError(f"allocation width must be >= 0, got {width}")
    return fit_mean(width * minmax(stat), 1.0, target, weights)


def rescale(stat: Sequence[float], target: float, epsilon: float, weights=None) -> list[float]:
    """Multiplicative form (AlphaPruning's `ww_sparsity`): r_k = 1 − ε + 2ε · norm_k ∈ [1 − ε, 1 + ε], then
    s_k = c · r_k with c = S · Σw / Σ w·r (the `weights`-weighted mean is S; parameter counts in the
    reference), clipped to [0, MAX_RATE] with the mean kept exactly S. Raises UsageError unless 0 <= ε < 1."""
    if not 0 <= epsilon < 1:
        raise UsageError(f"AlphaPruning ε must be in [0, 1), got {epsilon}")
    return fit_mean(0.0, 1 - epsilon + 2 * epsilon * minmax(stat), target, weights)
