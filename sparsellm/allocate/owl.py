"""OWL: layer-wise sparsity from each block's outlier ratio (Yin et al., "Outlier Weighed Layerwise
Sparsity (OWL)", ICML 2024, §3 "Layerwise Outlier Distribution"; algorithms.md §6).

    LOD_l = 100 · mean(A_l > M · mean(A_l))       A_l: Wanda scores |W|·‖X‖ of every Linear in block l
    s_l   = clip(S + λ − 2λ·norm_l + c, S − λ, S + λ),  norm_l = min-max normalised LOD_l ∈ [0, 1]

more outliers ⇒ lower sparsity; the shift c makes the (weighted) mean exactly S. `rates_for_model` takes
the scores from a dense pre-pass over the calibration windows (the engine's `dense_walk`); the rest are
pure functions of the outlier ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..registry import register

np = lazy_import("numpy")
torch = lazy_import("torch")


@dataclass
class OWLConfig:
    """OWL's M (outliers are scores above M × the mean), λ (rates stay within S ± λ) and granularity
    ("block": one rate per decoder block; "layer": one per linear, parameter-weighted mean S)."""

    owl_m: float = setting(5.0, "OWL's M: outliers are scores > M × the mean")
    owl_lambda: float = setting(0.08, "OWL's λ: rates stay within S ± λ")
    owl_granularity: str = setting("block", "OWL: one rate per decoder block, or one per linear layer",
                                   choices=("block", "layer"))

    def validate(self, target: float) -> "OWLConfig":
        if self.owl_granularity not in ("block", "layer"):
            raise UsageError(f"--owl_granularity must be block or layer, got {self.owl_granularity!r}")
        if not self.owl_m > 0:
            raise UsageError(f"--owl_m must be > 0, got {self.owl_m}")
        check_lambda(target, self.owl_lambda)
        return self


def _chunks(scores, chunk: int = 1 << 22):
    """Every score as float64, one slice of at most `chunk` elements at a time (no float64 copy of it all)."""
    for t in [scores] if isinstance(scores, torch.Tensor) else scores:
        flat = torch.as_tensor(t).detach().reshape(-1)
        for i in range(0, flat.numel(), chunk):
            yield flat[i:i + chunk].to(torch.float64)


def outlier_ratio(scores, m: float = 5.0) -> float:
    """Layer outlier distribution in percent: 100 · (#entries > m · mean) / #entries, over a tensor or a list
    of tensors of any shapes (the mean is the global one over all of them; nothing is concatenated).
    Raises UsageError if there are no scores."""
    total = sum(c.sum().item() for c in _chunks(scores))
    numel = sum(c.numel() for c in _chunks(scores))
    if numel == 0:
        raise UsageError("OWL outlier ratio of an empty set of scores")
    threshold = m * total / numel
    return 100.0 * sum((c > threshold).sum().item() for c in _chunks(scores)) / numel


def check_lambda(target: float, owl_lambda: float) -> None:
    """UsageError unless 0 <= λ, S − λ >= 0 and S + λ < 1 (so λ <= min(S, 1 − S), strict below 1 − S)."""
    if not (owl_lambda >= 0 and target - owl_lambda >= 0 and target + owl_lambda < 1):
        raise UsageError(f"OWL λ = {owl_lambda} is outside the allowed range at sparsity {target}: need "
                         f"0 <= λ <= min(S, 1 − S) = {min(target, 1 - target):.6g}, and λ < 1 − S strictly "
                         f"so that no block reaches sparsity 1")


def rates_from_lod(lod: Sequence[float], target: float, owl_lambda: float = 0.08,
                   weights: Sequence[float] | None = None) -> list[float]:
    """Block (or layer) rates from outlier ratios `lod` (percent, any scale: only the min-max normalised
    values matter). raw_j = S + λ − 2λ·norm_j; a constant shift c, solved exactly on the piecewise-linear
    mean, makes the `weights`-weighted mean (default equal; parameter counts for layer granularity) of
    clip(raw_j + c, S − λ, S + λ) equal S. All LOD equal (one block, flat model) or λ = 0 ⇒ every rate is S.

    With equal weights and no clipping this is exactly OWL's code (density = 2λ·norm − mean(2λ·norm) + 1 − S,
    c = 2λ(mean(norm) − ½)); that formula moves a rate up to 2λ from S when the normalised LOD is skewed,
    while the paper states s ∈ [S − λ, S + λ], which is enforced here. Raises UsageError for non-finite
    LOD, bad weights or a bad λ (`check_lambda`)."""
    check_lambda(target, owl_lambda)
    lod = np.asarray(lod, dtype=np.float64).reshape(-1)
    if lod.size == 0:
        return []
    w = np.ones_like(lod) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not np.isfinite(lod).all():
        raise UsageError(f"OWL outlier ratios must be finite numbers; got {lod.tolist()[:5]}")
    if w.shape != lod.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UsageError(f"OWL weights must be {lod.size} finite non-negative numbers with a positive sum")
    lo, hi = target - owl_lambda, target + owl_lambda
    if lod.max() == lod.min() or lo == hi:
        return [float(target)] * lod.size
    norm = (lod - lod.min()) / (lod.max() - lod.min())
    raw = target + owl_lambda - 2 * owl_lambda * norm
    # mean(c) = weighted mean of clip(raw + c) is non-decreasing and linear between these breakpoints
    bps = np.unique(np.concatenate([lo - raw, hi - raw]))
    means = np.clip(raw[None, :] + bps[:, None], lo, hi) @ w / w.sum()
    k = min(max(int(np.searchsorted(means, target, side="right")), 1), len(bps) - 1)  # means[k-1] <= S < means[k]
    span = means[k] - means[k - 1]
    c = bps[k - 1] + ((target - means[k - 1]) * (bps[k] - bps[k - 1]) / span if span > 0 else 0.0)
    rates = np.clip(raw + c, lo, hi)
    return [float(r) for r in rates]


def allocate(num_blocks: int, target: float, owl_lod: Sequence[float] | None = None,
             owl_lambda: float = 0.08, **_) -> list[float]:
    """OWL rates for `num_blocks` blocks at mean `target` from the dense model's per-block outlier ratios.
    Raises UsageError if `owl_lod` is missing or has the wrong length, or λ is out of range."""
    if owl_lod is None:
        raise UsageError("OWL needs the dense model's outlier ratios; use sparsellm.prune (the whole-model run) or compute "
                         "them with sparsellm.allocate.owl.outlier_ratio")
    if len(owl_lod) != num_blocks:
        raise UsageError(f"OWL got {len(owl_lod)} outlier ratios for {num_blocks} decoder blocks")
    check_lambda(target, owl_lambda)
    return rates_from_lod(owl_lod, target, owl_lambda)


@register("allocator", "owl", OWLConfig, needs="data")
@no_grad
def rates_for_model(model, calib_ids, target: float, config: OWLConfig, *, batch_size=None, progress=True, **_):
    """OWL rates from one dense pass over `calib_ids` (nsamples, seqlen): every block's (or linear's) outlier
    ratio of its Wanda scores |W|·‖X‖. Returns (rates, info): rates[i] is a float, or with layer
    granularity a dict {linear name: rate}; info has the settings and the outlier ratios."""
    from ..engine import dense_walk
    from ..models import block_linears
    from ..prune import wanda
    from . import check_rates

    units, weights, names = [], [], []
    for i, block, _, stats in dense_walk(model, calib_ids, need="norm", batch_size=batch_size, progress=progress):
        scores = {n: wanda.scores(lin.weight.float(), stats[n]) for n, lin in block_linears(model, block).items()}
        if config.owl_granularity == "block":
            units.append(outlier_ratio(list(scores.values()), config.owl_m))
            continue
        for n, sc in scores.items():
            units.append(outlier_ratio(sc, config.owl_m))
            weights.append(sc.numel())
            names.append((i, n))
    flat = rates_from_lod(units, target, config.owl_lambda, weights or None)
    info = {"owl_m": config.owl_m, "owl_lambda": config.owl_lambda, "owl_granularity": config.owl_granularity,
            "outlier_ratio": units}
    if config.owl_granularity == "block":
        return check_rates(flat, len(flat), target), info
    rates = [{} for _ in range(max(i for i, _ in names) + 1)]
    for (i, n), r in zip(names, flat):
        rates[i][n] = r
    return rates, info
