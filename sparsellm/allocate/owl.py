"""OWL: layer-wise sparsity from each block's outlier ratio (Yin et al., "Outlier Weighed Layerwise
Sparsity (OWL)", ICML 2024, §3 "Layerwise Outlier Distribution"; algorithms.md §6).

    LOD_l = 100 · mean(A_l > M · mean(A_l))       A_l: Wanda scores |W|·‖X‖ of every Linear in block l
    s_l   = clip(S + λ − 2λ·norm_l + c, S − λ, S + λ),  norm_l = min-max normalised LOD_l ∈ [0, 1]

more outliers ⇒ lower sparsity; the shift c makes the (weighted) mean exactly S. Pure functions: the engine
computes the scores from the dense model and passes the ratios in as `owl_lod`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError


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
        raise UsageError("OWL needs the dense model's outlier ratios; use sparsellm.api.prune or compute "
                         "them with sparsellm.allocate.owl.outlier_ratio")
    if len(owl_lod) != num_blocks:
        raise UsageError(f"OWL got {len(owl_lod)} outlier ratios for {num_blocks} decoder blocks")
    check_lambda(target, owl_lambda)
    return rates_from_lod(owl_lod, target, owl_lambda)
