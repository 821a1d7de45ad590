"""SparseGPT: mask selection and optimal weight update with the inverse Hessian of the layer inputs
(Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023, Algorithm 1; algorithms.md §4).

H = 2/n · Σ x xᵀ (fp32). Columns are processed in blocks of `blocksize`; within a block the mask is
chosen adaptively (lowest w² / [H⁻¹]_cc², or per N:M group), and each pruned column's error is spread
over the remaining columns through the upper Cholesky factor of H⁻¹.

An already sparse weight (at least `masks.ALREADY_SPARSE` exact zeros, e.g. a 50% model pruned again to
70%) keeps its zeros: they are forced into the mask of their column block (or N:M group) and count
towards its floor(numel · sparsity), so the block prunes only the rest. The OBS update of earlier columns
does reach them, as it reaches every weight whose mask is chosen later; being in the mask, each is then
set to zero and that change is spread over the later columns like any pruned weight's. Without this, the
updates refilled earlier zeros whenever C_in > blocksize. A weight with fewer zeros is pruned exactly as
the published algorithm does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


from ..config import setting
from ..errors import NonFiniteError, UsageError
from ..lazy import lazy_import
from ..registry import register
from .masks import NM, existing_zeros

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")


@dataclass
class SparseGPTConfig:
    """SparseGPT's own settings: the column block size B_s of Algorithm 1 and the Hessian dampening
    λ = percdamp · mean(diag H)."""

    blocksize: int = setting(128, "SparseGPT column block size")
    percdamp: float = setting(0.01, "SparseGPT dampening, fraction of mean diag(H)")

    def validate(self, *_) -> "SparseGPTConfig":
        if int(self.blocksize) < 1:
            raise UsageError(f"--blocksize must be >= 1, got {self.blocksize}")
        if not 0 < self.percdamp < 1e6:
            raise UsageError(f"--percdamp must be > 0, got {self.percdamp}")
        return self


def inverse_cholesky(H: torch.Tensor, percdamp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H). If H + λI is not positive
    definite, λ is multiplied by 10 and tried again (up to `retries` times); then UsageError is raised.
    A Hessian with NaN/inf entries raises NonFiniteError at once (no damping can fix it)."""
    if not torch.isfinite(H).all():
        raise NonFiniteError(f"SparseGPT: the Hessian has {int((~torch.isfinite(H)).sum())} NaN/inf values")
    damp = percdamp * torch.diag(H).mean().clamp_min(1e-8)
    for _ in range(retries + 1):  # at most three (C_in, C_in) matrices besides H alive at once
        A = H.clone()
        A.diagonal().add_(damp)  # H + λI, without an identity matrix
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return U
        log.warning("SparseGPT: Cholesky failed with damping %.3g; retrying with 10x more", float(damp))
        damp = damp * 10
    raise UsageError(f"SparseGPT: the Hessian is not positive definite even with {retries} tenfold increases of "
                     f"the damping (percdamp {percdamp}); use a larger --percdamp or more calibration data")


def prune_group(weights: list, stats, sparsities: list, nm: NM | None,
                blocksize: int = 128, percdamp: float = 0.01, **_) -> list:
    """Prune several weights (C_out_k, C_in) that read the same input (q/k/v, gate/up: one `stats`) with
    SparseGPT as ONE matrix, their rows stacked: one damped Hessian, one inverse Cholesky factor, one
    column loop. The result equals `prune` on each weight alone (Algorithm 1's OBS update is row by row),
    because the mask is still chosen per weight: unstructured, each weight's floor(numel_k · sparsity_k)
    lowest scores of its own rows of every column block (rates may differ, e.g. OWL's per-linear ones);
    N:M is per row anyway; the zeros of an already sparse weight are found per weight (`existing_zeros`).
    The weights may be of any float dtype and are not modified. Returns the new fp32 weights in order
    (views into one stacked tensor); a weight at sparsity 0 (unstructured) comes back as an unchanged fp32
    copy, as from `prune`. Raises as `inverse_cholesky`."""
    out = [None] * len(weights)
    todo = [k for k, s in enumerate(sparsities) if s > 0 or nm is not None]
    for k in set(range(len(weights))) - set(todo):
        out[k] = weights[k].clone().float()
    if not todo:
        return out
    zs = [existing_zeros(weights[k]) for k in todo]
    bounds = [0]
    for k in todo:
        bounds.append(bounds[-1] + weights[k].shape[0])
    if len(todo) == 1:
        W, zeros = weights[todo[0]].clone().float(), zs[0]
    else:  # copied into one fp32 matrix without an fp32 temporary per weight
        W = torch.empty(bounds[-1], weights[todo[0]].shape[1], dtype=torch.float32, device=weights[todo[0]].device)
        zeros = None if all(z is None for z in zs) else torch.zeros_like(W, dtype=torch.bool)
        for j, k in enumerate(todo):
            W[bounds[j]:bounds[j + 1]].copy_(weights[k])
            if zs[j] is not None:
                zeros[bounds[j]:bounds[j + 1]] = zs[j]
    segments = [(bounds[j], bounds[j + 1], sparsities[k]) for j, k in enumerate(todo)]
    _obs(W, zeros, stats, segments, nm, blocksize, percdamp)
    for j, k in enumerate(todo):
        out[k] = W[bounds[j]:bounds[j + 1]]
    return out


def _obs(W: torch.Tensor, zeros, stats, segments: list, nm: NM | None, blocksize: int, percdamp: float) -> None:
    """Algorithm 1 on W (rows, C_in) fp32, in place. zeros: (rows, C_in) bool of weights forced into the mask,
    or None; segments: [(row0, row1, sparsity)], the unstructured mask chosen within each."""
    rows, cols = W.shape
    H = stats.hessian.to(W.device).float() * (2.0 / max(stats.ntokens, 1))
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_cholesky(H, percdamp)
    del H  # 0.5 GB for a 7B model's down_proj
    if nm:  # a column block must hold whole N:M groups
        blocksize = max(nm.m, blocksize - blocksize % nm.m)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Z1 = None if zeros is None else zeros[:, i1:i2]  # the input's zeros: pruned first, and always
        if nm is None:
            score = None
            for r0, r1, sparsity in segments:  # each weight's own floor(numel · sparsity) of this block
                k = int((r1 - r0) * (i2 - i1) * sparsity)
                if k:
                    if score is None:
                        score = W1 ** 2 / d.reshape(1, -1) ** 2
                        if Z1 is not None:
                            score = score.masked_fill(Z1, -1.0)
                    mask1[r0:r1].view(-1)[torch.topk(score[r0:r1].flatten(), k, largest=False).indices] = True
            if Z1 is not None:
                mask1 |= Z1
        for i in range(i2 - i1):
            if nm and i % nm.m == 0:
                score = W1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].reshape(1, -1) ** 2
                if Z1 is not None:
                    score = score.masked_fill(Z1[:, i : i + nm.m], -1.0)
                idx = torch.topk(score, nm.m - nm.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
                if Z1 is not None:
                    mask1[:, i : i + nm.m] |= Z1[:, i : i + nm.m]
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # spread the error over the block's later columns
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


@register("pruner", "sparsegpt", SparseGPTConfig, needs="hessian", group=prune_group)
def prune(weight: torch.Tensor, stats, sparsity: float, nm: NM | None,
          blocksize: int = 128, percdamp: float = 0.01, **_) -> torch.Tensor:
    """Prune weight (C_out, C_in) with SparseGPT and return the updated weight. Unstructured: in each
    column block, the floor(numel · sparsity) lowest-score entries are pruned. N:M: M−N per group. The
    zeros of an already sparse weight (`masks.existing_zeros`) are always in the mask, so they stay zero."""
    return prune_group([weight], stats, [sparsity], nm, blocksize=blocksize, percdamp=percdamp)[0]
