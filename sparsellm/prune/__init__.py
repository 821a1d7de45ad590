"""Pruners: one module each, one interface, registered in `sparsellm.registry` under kind "pruner".

    new_weight = prune(weight, stats, sparsity, nm, **asdict(config))

`weight` is a (C_out, C_in) fp32 tensor (a copy; the caller writes the result back), `stats` the layer's
calibration statistics (`LayerStats`), `sparsity` a fraction in [0, 1), `nm` an `NM` pattern or None for
unstructured, `config` the pruner's own config dataclass (SparseGPT: blocksize, percdamp). The registry's
`needs` says which statistics a pruner reads ("none", "norm" or "hessian"). Adding a pruner is one file
that calls `register("pruner", name, Config, needs=...)` and one import line below.
"""

from __future__ import annotations

from ..lazy import lazy_import
from .masks import NM, check_sparsity, parse_pattern

torch = lazy_import("torch")


class LayerStats:
    """Calibration statistics of one linear's input X (tokens × C_in), accumulated in fp32.
    `sq_norm[j]` = Σ_t X[t, j]² (C_in,); `hessian` = Σ_t X[t]ᵀ X[t] (C_in, C_in) or None; `ntokens` = t;
    with need "moments" (structured pruning), also `total[j]` = Σ_t X[t, j] and `sq_norm` in fp64.

    On the CPU the Hessian is accumulated as its lower triangle (`add_gram_`) and made symmetric in place
    the first time `hessian` is read (every reader sees the full matrix)."""

    def __init__(self, ntokens: int = 0, sq_norm: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None, total: torch.Tensor | None = None):
        self.ntokens, self.sq_norm, self.total = ntokens, sq_norm, total
        self._hessian, self._lower = hessian, False  # _lower: only the lower triangle is up to date

    @property
    def hessian(self) -> torch.Tensor | None:
        if self._lower:
            mirror_lower_(self._hessian)
            self._lower = False
        return self._hessian

    @hessian.setter
    def hessian(self, value: torch.Tensor | None) -> None:
        self._hessian, self._lower = value, False

    def __repr__(self) -> str:
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return (f"LayerStats(ntokens={self.ntokens}, sq_norm={shape(self.sq_norm)}, "
                f"hessian={shape(self._hessian)}, total={shape(self.total)})")

    def add(self, x: torch.Tensor, need: str) -> None:
        """Accumulate a batch of inputs x (..., C_in)."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.ntokens += x.shape[0]
        if need == "moments":  # fp64: the variance E[x²] − E[x]² must not cancel away
            x = x.double()
            t = x.sum(0)
            self.total = t if self.total is None else self.total.add_(t)
        if need in ("norm", "hessian", "moments"):
            s = x.square().sum(0)  # 0.72–0.99× (x * x).sum(0); vector_norm, einsum slower (bench/syrk_bench.py)
            self.sq_norm = s if self.sq_norm is None else self.sq_norm.add_(s)
        if need == "hessian":
            if self._hessian is None:
                self._hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self._lower = add_gram_(self._hessian, x) or self._lower


def add_gram_(H: torch.Tensor, x: torch.Tensor, block: int = 256) -> bool:
    """H += xᵀx in place, for x (tokens × C) and H (C, C), both fp32 on one device. Returns True when only
    the lower triangle of H (diagonal included) is up to date (`mirror_lower_` completes it), False when all
    of H is.

    On the CPU the lower triangle by block columns, H[j:, j:j+b] += x[:, j:]ᵀ x[:, j:j+b] with b = `block`
    (torch's BLAS, in place: no (C, C) temporary, 0.5 GB for a 7B model's down_proj, and about 1/2 + b/(2C)
    of the multiply-adds). Inside the hooks of SmolLM2-135M's block 15 (2048 tokens per forward, a 2-core EPYC
    shared with other work) the updates took 0.89× and 0.73× the time of `H.add_(x.t() @ x)` on 8 × 256 and
    16 × 512 C4 windows (bench/hessian_in_context.py). SciPy's BLAS ssyrk (one triangle) took 0.31–0.50×
    alone on a quiet machine (bench/syrk_bench.py) but 0.97× and 0.93× in the hooks, where its own thread
    pool contends with torch's (the hooked forward: 1.11× and 1.21×); limited to one thread, 0.70× and 0.66×,
    which needs threadpoolctl (not a dependency): not used. Other devices keep the full `x.t() @ x` (no GPU
    could be measured)."""
    if H.device.type != "cpu":
        H.add_(x.t() @ x)
        return False
    for j in range(0, x.shape[1], block):
        H[j:, j:j + block].addmm_(x[:, j:].t(), x[:, j:j + block])
    return True


def mirror_lower_(H: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Copy the strict lower triangle of the square matrix H onto its upper one, in place, with temporaries of
    at most block × block elements (H itself may be a 7B model's 11008² fp32 Hessian). Returns H."""
    n = H.shape[0]
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        d = H[r0:r1, r0:r1]
        d.copy_(d.tril() + d.tril(-1).t())
        H[r0:r1, r1:] = H[r1:, r0:r1].t()
    return H

from . import magnitude  # noqa: E402, I001  (each import registers a pruner, in this order)
from . import wanda  # noqa: E402
from . import sparsegpt  # noqa: E402

__all__ = ["LayerStats", "NM", "parse_pattern", "check_sparsity", "magnitude", "wanda", "sparsegpt"]
