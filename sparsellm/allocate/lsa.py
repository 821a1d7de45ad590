"""LSA: layer-wise sparsity from each block's minimal linear reconstruction error (Yang et al., "LSA: Layer-wise
Sparsity Allocation by Minimal Linear Reconstruction Error", ICLR 2026; reference BeiYazi0/LSA
`layersp/blk.py::BlockWanda.blk_s` and `blk_score` (`--layer lsa`); allocators-engines-kernels.md §3).

Per linear, with H = Σ_t x_t x_tᵀ (C_in, C_in) of its dense calibration inputs, greedily prune ρ = 50% of
every row inside each column block of B columns, always taking the weight whose removal adds the least output
error given the ones already removed:

    e_ij = W_ij² H_jj                       the error of zeroing W_ij alone
    pick p = argmin_j e_ij in every row;    E += e_ip
    e_ij += 2 W_ij W_ip H_pj (j in block);  e_ip = ∞
    after the block: e_ij += 2 W_ij Σ_{p removed} W_ip H_pj for the later columns j

so E = Σ_rows w_Pᵀ H_PP w_P = ‖(W − Ŵ) Xᵀ‖²_F exactly, Ŵ the greedily pruned W (no weight is updated).
The block statistic is E_l = |mean of its linears' E| and the rates are DLP's form,
s_l = S + 2λ·(norm_l − mean(norm)) (higher error ⇒ higher sparsity), with λ from the code's table by int(10·S).

Deviations: the reference's H is (2/n_seq)·Σ x xᵀ; the scale cancels in the min-max step. A last column block
narrower than floor(B·ρ) prunes its whole width (the reference would add ∞). Rates stay in [0, 0.99] with
the mean exactly S (the reference does not clip). Per-projection allocation (`lsab`/`lsac`) is not built.
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

LAMBDA_TABLE = {1: 0.06, 2: 0.02, 3: 0.04, 4: 0.02, 5: 0.04, 6: 0.10, 7: 0.15, 8: 0.12}  # `BLK.alpha`, by int(10·S)
LAMBDA_DEFAULT = 0.08  # `--Lamda`, the code's index 0 (and here any S off the table)


@dataclass
class LSAConfig:
    """LSA's λ (rates span 2λ; None: the code's table by S), column block width B and per-row ratio ρ."""

    lsa_lambda: float | None = setting(None, "LSA's λ: block rates span 2λ (default when left out: the code's table, "
                                              "0.15 at S = 0.7)")
    lsa_block: int = setting(128, "LSA: column block width of the greedy error (0: the whole row; README: 128)")
    lsa_resp: float = setting(0.5, "LSA: fraction of each row's column block pruned by the greedy error")

    def validate(self, target: float) -> "LSAConfig":
        if self.lsa_lambda is not None and not (0 <= self.lsa_lambda < 0.5 and math.isfinite(self.lsa_lambda)):
            raise UsageError(f"--lsa_lambda must be in [0, 0.5), got {self.lsa_lambda}")
        if int(self.lsa_block) < 0:
            raise UsageError(f"--lsa_block must be >= 0, got {self.lsa_block}")
        if not 0 < self.lsa_resp < 1:
            raise UsageError(f"--lsa_resp must be in (0, 1), got {self.lsa_resp}")
        return self


def lambda_for(target: float) -> float:
    """λ of the reference's table `BLK.alpha[int(10·S)]` (0.15 at S = 0.7); 0.08 off the table."""
    return LAMBDA_TABLE.get(int(target * 10), LAMBDA_DEFAULT)


def greedy_error(weight, hessian, block: int = 128, resp: float = 0.5, return_mask: bool = False):
    """E: the output error ‖(W − Ŵ)Xᵀ‖² (in units of H) of greedily zeroing floor(B·ρ) weights per row in every
    column block of width B (0: one block), W (d_out, d_in), H (d_in, d_in) = Σ x xᵀ, in float32 as the
    reference. Returns E as a float, or (E, mask) with mask (d_out, d_in) bool True where pruned."""
    W = weight.detach().float()
    H = hessian.detach().to(W.device, torch.float32)
    rows, cols = W.shape
    width = cols if block == 0 else int(block)
    per_block = int(width * resp)
    score = W.square() * H.diagonal().reshape(1, -1)
    mask = torch.zeros_like(W, dtype=torch.bool)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for c0 in range(0, cols, width):
        c1 = min(c0 + width, cols)
        S1, W1, H11 = score[:, c0:c1], W[:, c0:c1], H[c0:c1, c0:c1]
        removed = torch.zeros_like(W1)
        for _ in range(min(per_block, c1 - c0)):
            p = S1.argmin(dim=1, keepdim=True)  # (rows, 1)
            total += S1.gather(1, p).double().sum()
            wp = W1.gather(1, p)
            S1 += 2 * W1 * wp * H11[p.squeeze(1)]  # e_ij += 2 W_ij W_ip H_pj
            S1.scatter_(1, p, math.inf)
            removed.scatter_(1, p, wp)
        mask[:, c0:c1] = torch.isinf(S1)
        if c1 < cols:
            score[:, c1:] += 2 * W[:, c1:] * (removed @ H[c0:c1, c1:])
    return (float(total), mask) if return_mask else float(total)


def rates_from_errors(errors, target: float, lsa_lambda: float | None = None) -> list[float]:
    """Block rates from block errors E (L,): S + 2λ·(norm − mean(norm)) in [0, 0.99], mean exactly S."""
    lam = lambda_for(target) if lsa_lambda is None else lsa_lambda
    return minmax.recentre(errors, target, 2 * lam)


@register("allocator", "lsa", LSAConfig, needs="data")
@no_grad
def rates_for_model(model, calib_ids, target: float, config: LSAConfig, *, batch_size=None, progress=True, **_):
    """LSA rates from one dense pass: every linear's greedy error from its input Hessian. Returns (rates, info
    with λ, B, ρ and the block errors E_l)."""
    from ..engine import dense_walk
    from ..models import block_linears
    from . import check_rates

    errors = []
    for _, block, _, stats in dense_walk(model, calib_ids, need="hessian", batch_size=batch_size, progress=progress):
        per_linear = [greedy_error(lin.weight, stats[n].hessian, config.lsa_block, config.lsa_resp)
                      for n, lin in block_linears(model, block).items()]
        errors.append(abs(sum(per_linear) / len(per_linear)))
    lam = lambda_for(target) if config.lsa_lambda is None else config.lsa_lambda
    rates = rates_from_errors(errors, target, lam)
    info = {"lsa_lambda": lam, "lsa_block": config.lsa_block, "lsa_resp": config.lsa_resp, "block_errors": errors}
    return check_rates(rates, len(rates), target), info
