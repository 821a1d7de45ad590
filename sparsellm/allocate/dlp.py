"""DLP: layer-wise sparsity from each block's mean Wanda score (Chen et al., "DLP: Dynamic Layerwise Pruning
in Large Language Models", ICML 2025, arXiv 2505.23807; reference ironartisan/DLP `lib/prune.py::get_dlp_ratios`;
allocators-engines-kernels.md §1).

    U_l = |mean(S_l)|     S_l: the Wanda scores |W|·‖X_j‖ of all linears of block l, as one flat vector
    s_l = S + 2α · (norm_l − mean(norm)),   norm = min-max normalised U ∈ [0, 1]

so the rates span exactly 2α, their unweighted mean is S, and sparsity grows with the score (deeper blocks,
whose activations are larger, are pruned more). This is the code's closed form: its I_l = 1 − U_l/ΣU is a
decreasing affine map of U, so min-max scaling I to [0, 2α] and taking keep = 1 − S + Ĩ − mean(Ĩ) gives the
line above.

Deviations kept from the reference and from the paper:
- The paper (and LSA's re-implementation, BeiYazi0/LSA `layersp/dlp.py::dlp_score`) describe the **median**
  score; the released unstructured path, which produced the published ratios, uses the **mean**. Default
  `--dlp_score mean`; `median` is the paper's variant.
- The reference sets s <= 0 to 0.01 and never clips above; here the rates are kept in [0, 0.99] with the mean
  still exactly S (`minmax.fit_mean`). At α <= min(S, 0.99 − S)/2 nothing is ever clipped.
- The scores come from one dense pass (the reference runs each block's forward twice; the second is redundant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..registry import register
from . import minmax

torch = lazy_import("torch")

SCORES = ("mean", "median")


@dataclass
class DLPConfig:
    """DLP's α (the rates span 2α around S) and the block statistic (mean, as the code; median, as the paper)."""

    dlp_alpha: float = setting(0.15, "DLP's α: block rates span S − α .. S + α at most (2α wide)")
    dlp_score: str = setting("mean", "DLP block statistic of the Wanda scores: mean (the released code) or median "
                                     "(the paper)", choices=SCORES)

    def validate(self, target: float) -> "DLPConfig":
        check_alpha(self.dlp_alpha)
        if self.dlp_score not in SCORES:
            raise UsageError(f"--dlp_score must be mean or median, got {self.dlp_score!r}")
        return self


def check_alpha(alpha: float, name: str = "DLP α") -> None:
    """UsageError unless 0 <= α < 0.5 (the rates span 2α, which must stay below 1)."""
    if not (0 <= alpha < 0.5 and math.isfinite(alpha)):
        raise UsageError(f"{name} must be in [0, 0.5), got {alpha}")


def block_score(scores, statistic: str = "mean") -> float:
    """U_l: |mean| (or |median|) of the Wanda scores of one block, given as a list of tensors of any shapes
    (every entry counts once, as the reference's concatenation; the mean is accumulated in float64)."""
    flats = [torch.as_tensor(s).detach().reshape(-1) for s in scores]
    if sum(f.numel() for f in flats) == 0:
        raise UsageError("DLP score of an empty set of weights")
    if statistic == "median":  # torch.median: the lower of the two middle values, as the reference's
        return abs(float(torch.cat([f.float() for f in flats]).median()))
    total = sum(float(f.to(torch.float64).sum()) for f in flats)
    return abs(total / sum(f.numel() for f in flats))


def rates_from_scores(scores, target: float, alpha: float = 0.15) -> list[float]:
    """Block rates from the block scores U (L,): S + 2α·(norm − mean(norm)), in [0, 0.99], unweighted mean
    exactly S; all U equal or one block ⇒ every rate is S. Raises UsageError for a bad α or non-finite U."""
    check_alpha(alpha)
    return minmax.recentre(scores, target, 2 * alpha)


@no_grad
def block_scores(model, calib_ids, statistic: str = "mean", batch_size=None, progress=True) -> list[float]:
    """U_l for every block from one dense pass over `calib_ids` (nsamples, seqlen)."""
    from ..engine import dense_walk
    from ..models import block_linears
    from ..prune import wanda

    out = []
    for _, block, _, stats in dense_walk(model, calib_ids, need="norm", batch_size=batch_size, progress=progress):
        out.append(block_score([wanda.scores(lin.weight.float(), stats[n])
                                for n, lin in block_linears(model, block).items()], statistic))
    return out


@register("allocator", "dlp", DLPConfig, needs="data")
def rates_for_model(model, calib_ids, target: float, config: DLPConfig, *, batch_size=None, progress=True, **_):
    """DLP rates from one dense pass (Wanda scores of every block). Returns (rates, info with α, the statistic
    and the block scores U)."""
    from . import check_rates

    scores = block_scores(model, calib_ids, config.dlp_score, batch_size, progress)
    rates = rates_from_scores(scores, target, config.dlp_alpha)
    info = {"dlp_alpha": config.dlp_alpha, "dlp_score": config.dlp_score, "block_scores": scores}
    return check_rates(rates, len(rates), target), info
