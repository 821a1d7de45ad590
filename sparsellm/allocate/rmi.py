"""LoSA's layer-wise sparsity from representation mutual information (Huang et al., "Dynamic Low-Rank Sparse
Adaptation for Large Language Models", ICLR 2025; the official code's linear-CKA estimator; algorithms.md §8.2).

    K_i  = F_i F_iᵀ,  F_i = block i's inputs flattened per sample (n × seqlen·hidden);  K̃_i = H K_i H
    CKA(i, j) = ⟨K̃_i, K̃_j⟩_F / (‖K̃_i‖_F ‖K̃_j‖_F)
    r_i = Σ_{j≠i} CKA(i, j) / Σ_k r_k,   I_i = exp(−β r_i)
    min Σ_i x_i I_i  s.t.  mean(x) = S,  x_i ∈ [S − δ, S + δ]

Only n × n Grams are kept (the reference holds every block's features). `rates_for_model` streams the block
inputs of a dense pre-pass (the engine's `dense_walk`) into `GramStream`; the rest are pure functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..registry import register

np = lazy_import("numpy")
torch = lazy_import("torch")

log = logging.getLogger("sparsellm")


@dataclass
class RMIConfig:
    """RMI's settings: windows for the block CKA, the importance exp(−β·redundancy) (None: the reference's
    1 for Wanda, 100 for SparseGPT) and the half-width δ of the rates (None: `delta_for(S)`)."""

    rmi_nsamples: int = setting(64, "RMI: calibration windows for the block CKA")
    rmi_beta: float | None = setting(None, "RMI importance exp(−β·redundancy) (default when left out: 1 for wanda, "
                                           "100 for sparsegpt)")
    rmi_delta: float | None = setting(None, "RMI: rates stay within S ± δ (default when left out: 0.01/0.02/0.03 "
                                            "for S <= 0.5/0.6/larger)")

    def validate(self, target: float) -> "RMIConfig":
        if int(self.rmi_nsamples) < 3:  # two centred Gram matrices of two samples are always proportional
            raise UsageError(f"--rmi_nsamples must be >= 3 (RMI's CKA), got {self.rmi_nsamples}")
        if self.rmi_beta is not None and not (self.rmi_beta > 0 and math.isfinite(self.rmi_beta)):
            raise UsageError(f"RMI β must be a positive number; got {self.rmi_beta}")
        check_delta(target, self.rmi_delta)
        return self


def gram(X: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(n, n) float64 Gram F Fᵀ of block inputs X (n, seqlen, hidden), F = X.reshape(n, seqlen·hidden),
    summed over slices of `chunk` positions so that only one slice at a time is upcast to float64.
    Computed on X's device. A 2-D X (n, d) is one position."""
    X = X.detach().unsqueeze(1) if X.dim() == 2 else X.detach().reshape(X.shape[0], X.shape[1], -1)
    K = torch.zeros(n := X.shape[0], n, dtype=torch.float64, device=X.device)
    for s in range(0, X.shape[1], chunk):
        F = X[:, s:s + chunk].reshape(n, -1).to(torch.float64)
        K += F @ F.T
    return K


class GramStream:
    """Collects one centred Gram K̃ = H K H (H = I − 11ᵀ/n, on the CPU) per block, in block order."""

    def __init__(self, chunk: int = 256):
        self.chunk, self.grams = chunk, []

    def __len__(self) -> int:
        return len(self.grams)

    def add(self, X: torch.Tensor) -> None:
        """Append block inputs X (n, seqlen, hidden); n must match the earlier blocks. A Gram whose centred
        norm is below 1e-12 of its uncentred norm (all samples alike) is stored as exactly zero."""
        K = gram(X, self.chunk).cpu()
        if self.grams and K.shape != self.grams[0].shape:
            raise UsageError(f"RMI: block has {K.shape[0]} samples, earlier blocks {self.grams[0].shape[0]}")
        Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        self.grams.append(torch.zeros_like(Kc) if Kc.norm() <= 1e-12 * K.norm() else Kc)

    def cka(self) -> np.ndarray:
        """(L, L) linear CKA, symmetric, ones on the diagonal; 0 in the row/column of a zero Gram."""
        if not self.grams:
            return np.zeros((0, 0))
        V = torch.stack(self.grams).reshape(len(self.grams), -1)
        G = (V @ V.T).numpy()
        norms = np.sqrt(np.diag(G).copy())
        denom = np.outer(norms, norms)
        cka = np.divide(G, denom, out=np.zeros_like(G), where=denom > 0)
        np.fill_diagonal(cka, (norms > 0).astype(np.float64))
        return (cka + cka.T) / 2


def delta_for(target: float) -> float:
    """Rate half-width δ: 0.01 for S <= 0.5, 0.02 for S <= 0.6, 0.03 for S <= 0.7 (the reference code) and 0.03
    for S > 0.7 too (undefined there: the code keeps its last value). Always capped at min(S, 1 − S)/2 so that
    S ± δ stays inside [0, 1) (e.g. 0.025 at S = 0.95)."""
    delta = 0.01 if target <= 0.5 else 0.02 if target <= 0.6 else 0.03
    return min(delta, min(target, 1 - target) / 2)


def rates_from_cka(cka, target: float, rmi_beta: float = 1.0, rmi_delta: float | None = None) -> list[float]:
    """Block rates from an (L, L) CKA matrix by the LP above (scipy HiGHS), mean exactly S (|mean − S| < 1e-12).
    δ defaults to `delta_for(S)`. The objective is linear, so the optimum is bang-bang: the more redundant
    blocks get S + δ, the rest S − δ (one block sits in between for odd L); β > 0 only matters through the
    ordering (β = 1 in the reference's Wanda path, 100 in its SparseGPT path). All redundancies zero or all
    importances equal ⇒ every rate is S. Raises UsageError for a non-square or non-finite matrix, β <= 0,
    δ < 0, S ± δ outside [0, 1), or an LP failure."""
    cka = np.asarray(cka, dtype=np.float64)
    delta = delta_for(target) if rmi_delta is None else float(rmi_delta)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1] or not np.isfinite(cka).all():
        raise UsageError(f"RMI needs a finite square CKA matrix; got shape {cka.shape}")
    if not (rmi_beta > 0 and math.isfinite(rmi_beta)):
        raise UsageError(f"RMI β must be a positive number; got {rmi_beta}")
    if not (delta >= 0 and target - delta >= 0 and target + delta < 1):
        raise UsageError(f"RMI δ = {delta} must satisfy 0 <= δ, S − δ >= 0 and S + δ < 1 at sparsity {target}")
    L = cka.shape[0]
    r = cka.sum(1) - np.diag(cka)
    if r.sum() <= 0:
        return [float(target)] * L
    imp = np.exp(-rmi_beta * r / r.sum())
    if delta == 0 or imp.max() == imp.min():
        return [float(target)] * L
    # variables y = x − S; the cost is shifted and scaled (same optimum under Σ y = 0) for HiGHS's tolerances
    cost = (imp - imp.mean()) / (imp.max() - imp.min())
    from scipy.optimize import linprog  # imported here: scipy takes ~0.5 s to import

    res = linprog(cost, A_eq=np.ones((1, L)), b_eq=[0.0], bounds=[(-delta, delta)] * L, method="highs")
    if res.status != 0:
        raise UsageError(f"RMI linear programme failed: {res.message}")
    y = np.clip(res.x, -delta, delta)
    return [float(v) for v in target + (y - y.mean())]


def allocate(num_blocks: int, target: float, rmi_cka=None, rmi_beta: float = 1.0,
             rmi_delta: float | None = None, **_) -> list[float]:
    """RMI rates for `num_blocks` blocks at mean `target` from the (L, L) CKA of the current model's block
    inputs. Raises UsageError if `rmi_cka` is missing or not (num_blocks, num_blocks), or as `rates_from_cka`."""
    if rmi_cka is None:
        raise UsageError("RMI needs the CKA matrix of the block inputs; use sparsellm.prune (the whole-model run) or compute it "
                         "with sparsellm.allocate.rmi.GramStream")
    shape = np.shape(rmi_cka)
    if shape != (num_blocks, num_blocks):
        raise UsageError(f"RMI got a CKA matrix of shape {shape} for {num_blocks} blocks")
    return rates_from_cka(rmi_cka, target, rmi_beta, rmi_delta)


def check_delta(target: float, rmi_delta: float | None) -> None:
    """UsageError unless 0 <= δ, S − δ >= 0 and S + δ < 1 (δ = None: the default `delta_for(S)`, always valid)."""
    if rmi_delta is None:
        return
    if not (rmi_delta >= 0 and target - rmi_delta >= 0 and target + rmi_delta < 1):
        raise UsageError(f"RMI δ = {rmi_delta} must satisfy 0 <= δ, S − δ >= 0 and S + δ < 1 at sparsity {target}")


@register("allocator", "rmi", RMIConfig, needs="data")
@no_grad
def rates_for_model(model, calib_ids, target: float, config: RMIConfig, *, prune_method: str = "wanda",
                    batch_size=None, progress=True, **_):
    """RMI rates from the (n, n) Gram matrices of every block's inputs over the first `rmi_nsamples`
    calibration windows. Returns (rates, info with the settings used and the CKA matrix). Raises
    UsageError for fewer than 3 windows (two centred Grams of two samples are always proportional)."""
    from ..engine import dense_walk
    from . import check_rates

    n = min(config.rmi_nsamples, calib_ids.shape[0])
    if n < 3:
        raise UsageError(f"RMI needs at least 3 calibration windows for its CKA, got {n}")
    if n < 16:
        log.warning("RMI's CKA from only %d windows is noisy (the reference uses 64)", n)
    grams = GramStream()
    for _, _, X, _ in dense_walk(model, calib_ids[:n], batch_size=batch_size, progress=progress):
        grams.add(X)
    cka = grams.cka()
    beta = config.rmi_beta if config.rmi_beta is not None else (100.0 if prune_method == "sparsegpt" else 1.0)
    rates = rates_from_cka(cka, target, beta, config.rmi_delta)
    info = {"rmi_nsamples": n, "rmi_beta": beta,
            "rmi_delta": config.rmi_delta if config.rmi_delta is not None else delta_for(target),
            "cka": [[round(float(v), 6) for v in row] for row in cka]}
    return check_rates(rates, len(rates), target), info
