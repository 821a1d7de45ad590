"""Pruners: one module each, one interface, registered in `sparsellm.registry` under kind "pruner".

    new_weight = prune(weight, stats, sparsity, nm, **asdict(config))

`weight` is a (C_out, C_in) fp32 tensor (a copy; the caller writes the result back), `stats` the layer's
calibration statistics (`LayerStats`), `sparsity` a fraction in [0, 1), `nm` an `NM` pattern or None for
unstructured, `config` the pruner's own config dataclass (SparseGPT: blocksize, percdamp). The registry's
`needs` says which statistics a pruner reads ("none", "norm" or "hessian"). Adding a pruner is one file
that calls `register("pruner", name, Config, needs=...)` and one import line below.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..lazy import lazy_import
from .masks import NM, check_sparsity, parse_pattern

torch = lazy_import("torch")


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input X (tokens × C_in), accumulated in fp32.
    `sq_norm[j]` = Σ_t X[t, j]² (C_in,); `hessian` = Σ_t X[t]ᵀ X[t] (C_in, C_in) or None; `ntokens` = t;
    with need "moments" (structured pruning), also `total[j]` = Σ_t X[t, j] and `sq_norm` in fp64."""

    ntokens: int = 0
    sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    total: torch.Tensor | None = None

    def add(self, x: torch.Tensor, need: str) -> None:
        """Accumulate a batch of inputs x (..., C_in)."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.ntokens += x.shape[0]
        if need == "moments":  # fp64: the variance E[x²] − E[x]² must not cancel away
            x = x.double()
            t = x.sum(0)
            self.total = t if self.total is None else self.total.add_(t)
        if need in ("norm", "hessian", "moments"):
            s = (x * x).sum(0)
            self.sq_norm = s if self.sq_norm is None else self.sq_norm.add_(s)
        if need == "hessian":
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)


from . import magnitude  # noqa: E402, I001  (each import registers a pruner, in this order)
from . import wanda  # noqa: E402
from . import sparsegpt  # noqa: E402

__all__ = ["LayerStats", "NM", "parse_pattern", "check_sparsity", "magnitude", "wanda", "sparsegpt"]
