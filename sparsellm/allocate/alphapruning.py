"""AlphaPruning: layer-wise sparsity from the heavy-tailed shape of each weight's spectrum (Lu et al.,
"AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise Pruning of Large Language
Models", NeurIPS 2024, arXiv 2410.10912, §3; reference haiquanlu/AlphaPruning `lib/esd_utils.py::
net_esd_estimator` (fix_fingers="xmin_peak") and `lib/prune.py::ww_sparsity`; allocators-engines-kernels.md §2).

    λ = svdvals(W)², ascending                    the ESD of WᵀW, W (d_out, d_in) (eigvalsh of the Gram)
    α_i = 1 + n / (Σ_{k>=i} ln λ_k − n ln λ_i)    Hill estimate with x_min = λ_i, tail n = N − i
    D_i = max_t |1 − (λ_{i+t}/λ_i)^{1−α_i} − t/n|  Kolmogorov–Smirnov distance of the fitted power law
    PL_Alpha_Hill = α_i at argmin D_i over the x_min candidates of the "xmin_peak" rule
    r_k = 1 − ε + 2ε · norm(m_k),  s_k = c · r_k,  c = S · ΣN / Σ N·r   (parameter-weighted mean S)

higher α (lighter tail, "less trained") ⇒ higher sparsity. The metric needs no data: 7 SVDs per LLaMA block.
Granularity: the reference's default `--mapping_type block_wise` gives every linear its block's mean metric
(one rate per block); `layer_wise` keeps each linear's own metric (one rate per linear, dicts {name: rate}).

Deviations kept from the reference: its x_min lower bound log10(0.95·x_peak) mixes log and linear units (so
below x_peak ≈ 1.05 every eigenvalue up to 1.5·x_peak is a candidate): replicated for parity. Its rates are
not clipped; here they stay in [0, 0.99] with the mean exactly S. Zero eigenvalues, which make the reference's
Hill estimate NaN, are never candidates here; the spectrum (from the Gram matrix, `esd`) and the KS distances
are in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..registry import register
from . import minmax

np = lazy_import("numpy")
torch = lazy_import("torch")

MAPPINGS = ("block_wise", "layer_wise")


@dataclass
class AlphaPruningConfig:
    """AlphaPruning's ε (rates in S·[1 − ε, 1 + ε] before the rescale) and its mapping type."""

    alpha_epsilon: float = setting(0.3, "AlphaPruning's ε: rates proportional to [1 − ε, 1 + ε]")
    alpha_mapping: str = setting("block_wise", "AlphaPruning: block_wise (each linear takes its block's mean metric, "
                                               "the reference default) or layer_wise (one rate per linear)",
                                 choices=MAPPINGS)

    def validate(self, target: float) -> "AlphaPruningConfig":
        if not (0 <= self.alpha_epsilon < 1):
            raise UsageError(f"--alpha_epsilon must be in [0, 1), got {self.alpha_epsilon}")
        if self.alpha_mapping not in MAPPINGS:
            raise UsageError(f"--alpha_mapping must be block_wise or layer_wise, got {self.alpha_mapping!r}")
        return self


def esd(weight) -> "np.ndarray":
    """(min(d_out, d_in),) float64 eigenvalues of WᵀW for W (d_out, d_in), ascending: the squared singular
    values of W. Computed as the eigenvalues of the smaller Gram matrix in float64 (`eigvalsh`), which agree
    with the reference's float32 `svdvals(W)²` to ~1e-7 relative and take 0.5 s instead of 10 s for a
    576 × 1536 weight on 2 CPU cores; rounding negatives are set to 0."""
    W = weight.detach().to("cpu", torch.float64)
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return np.sort(np.clip(torch.linalg.eigvalsh(G).numpy(), 0.0, None))


def xmin_peak_range(eigs, bins: int = 100) -> tuple[float, float]:
    """The "xmin_peak" bounds (lower, upper) on the x_min candidates of an ascending spectrum: x_peak = 10 to the
    left edge of the fullest of `bins` equal bins of log10 λ between its min and max; upper = 1.5·x_peak, lower =
    log10(0.95·x_peak) (the reference's unit mix, kept). Raises UsageError for a spectrum without a positive
    eigenvalue."""
    eigs = np.asarray(eigs, dtype=np.float64)
    pos = eigs[eigs > 0]
    if pos.size == 0:
        raise UsageError("AlphaPruning: a weight whose singular values are all zero has no spectrum to fit")
    logs = np.log10(pos)
    lo, hi = logs.min(), logs.max()
    if hi == lo:
        peak = lo
    else:
        counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
        peak = edges[int(np.argmax(counts))]
    x_peak = 10.0 ** peak
    return math.log10(0.95 * x_peak), 1.5 * x_peak


def pl_alpha_hill(eigs, fix_fingers: str = "xmin_peak", bins: int = 100) -> tuple[float, float]:
    """(α, D): the power-law exponent of an ascending spectrum `eigs` (N,) and its KS distance, chosen as in
    `net_esd_estimator`: every candidate x_min = λ_i (i < N − 1; within `xmin_peak_range` for "xmin_peak", any
    for None) gets its Hill estimate, and a KS distance when α_i > 1; the lowest distance wins (the first on
    ties). No admissible candidate ⇒ (0.0, 1.0), as the reference. Raises UsageError for an unknown rule."""
    if fix_fingers not in ("xmin_peak", None):
        raise UsageError(f"unknown x_min rule {fix_fingers!r}; use xmin_peak or None")
    lam = np.sort(np.asarray(eigs, dtype=np.float64).reshape(-1))
    N = lam.size
    lower, upper = xmin_peak_range(lam, bins) if fix_fingers == "xmin_peak" else (-math.inf, math.inf)
    with np.errstate(divide="ignore"):
        logs = np.log(lam)
    tail_sum = np.cumsum(logs[::-1])[::-1]  # Σ_{k>=i} ln λ_k
    best = (1.0, 0.0)  # (D, α) of the reference's untouched slot 0
    for i in range(N - 1):
        if lam[i] < lower:
            continue
        if lam[i] > upper:
            break
        if lam[i] <= 0:
            continue
        n = N - i
        denom = tail_sum[i] - n * logs[i]
        if not denom > 0:
            continue
        alpha = 1 + n / denom
        D = 1.0
        if alpha > 1:
            t = np.arange(n)
            D = float(np.max(np.abs(1 - (lam[i:] / lam[i]) ** (1 - alpha) - t / n)))
        if D < best[0] or (i == 0 and D == best[0]):  # slot 0 starts at (D 1, α 0) and is overwritten
            best = (D, alpha)
    return float(best[1]), float(best[0])


def layer_metrics(model) -> tuple[list[list[str]], list[list[float]], list[list[int]]]:
    """(names, α, numel) per block, linears in the architecture table's order (`models.block_linears`)."""
    from ..models import block_linears, get_blocks

    names, metrics, sizes = [], [], []
    for block in get_blocks(model):
        linears = block_linears(model, block)
        names.append(list(linears))
        metrics.append([pl_alpha_hill(esd(lin.weight))[0] for lin in linears.values()])
        sizes.append([lin.weight.numel() for lin in linears.values()])
    return names, metrics, sizes


def rates_from_metrics(metrics, sizes, target: float, epsilon: float = 0.3,
                       mapping: str = "block_wise") -> list[list[float]]:
    """Per-linear rates (L lists of K) from per-linear metrics and parameter counts: block_wise replaces each
    metric by its block's mean; then `minmax.rescale` with the parameter counts as weights, so the
    parameter-weighted mean is exactly S and every rate is in [0, 0.99]. Raises UsageError for bad ε or shapes."""
    if mapping not in MAPPINGS:
        raise UsageError(f"AlphaPruning mapping must be block_wise or layer_wise, got {mapping!r}")
    if [len(m) for m in metrics] != [len(s) for s in sizes]:
        raise UsageError("AlphaPruning: metrics and parameter counts differ in shape")
    if mapping == "block_wise":
        metrics = [[float(np.mean(m))] * len(m) for m in metrics]
    flat = minmax.rescale([v for m in metrics for v in m], target, epsilon, [n for s in sizes for n in s])
    out, k = [], 0
    for m in metrics:
        out.append(flat[k:k + len(m)])
        k += len(m)
    return out


@register("allocator", "alphapruning", AlphaPruningConfig, needs="weights")
@no_grad
def rates_for_model(model, calib_ids, target: float, config: AlphaPruningConfig, **_):
    """AlphaPruning rates from the weights alone (no calibration data). Returns (rates, info): rates[i] is a
    float per block (block_wise mapping on equal-size blocks) or a dict {linear name: rate}; info has ε, the
    mapping and every linear's PL_Alpha_Hill."""
    from . import check_rates

    names, metrics, sizes = layer_metrics(model)
    per_linear = rates_from_metrics(metrics, sizes, target, config.alpha_epsilon, config.alpha_mapping)
    info = {"alpha_epsilon": config.alpha_epsilon, "alpha_mapping": config.alpha_mapping,
            "pl_alpha_hill": [dict(zip(n, m)) for n, m in zip(names, metrics)]}
    if config.alpha_mapping == "block_wise" and len({sum(s) for s in sizes}) == 1:
        rates = [r[0] for r in per_linear]
        return check_rates(rates, len(rates), target), info
    return [dict(zip(n, r)) for n, r in zip(names, per_linear)], info
