"""Importance of attention heads and MLP channels for structured pruning, computed once from the dense
model's calibration statistics (algorithms.md §9.3), so that applying any rate vector needs no new pass.

Only the inputs of the output projections are scored: o_proj's input channels (grouped by head) and
down_proj's input channels (the MLP's intermediate channels). For input channel j of W (C_out × C_in):

    wanda-sp       mean_i |W_ij| · ‖X_j‖₂               (FLAP repo's Wanda-sp baseline)
    magnitude-sp   ‖W_:j‖₂                              (column norm; needs no data)
    flap           Var(X_j) · ‖W_:j‖₂²                  (FLAP's fluctuation metric, An et al., AAAI 2024, Eq. 4)

A head's score is the sum of its head_dim channels' scores.
"""

from __future__ import annotations


from ..engine import dense_walk
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..models.arch import struct_spec
from .shrink import geometry

torch = lazy_import("torch")

METRICS = ("wanda-sp", "flap", "magnitude-sp")


def check_metric(metric: str) -> None:
    """Raises UsageError for a metric not in `METRICS`."""
    if metric not in METRICS:
        raise UsageError(f"unknown importance metric {metric!r}; choose from {', '.join(METRICS)}")


@no_grad
def collect_stats(model, calib_ids: torch.Tensor, batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Run the dense model block by block over calibration windows (nsamples, seqlen) and keep, for every
    block, the input moments (Σx, Σx², tokens) of its attention output and MLP down projections:
    [{"o": LayerStats, "down": LayerStats}] per block (C_in-sized vectors, fp64)."""
    spec = struct_spec(model)
    out = []
    for _, block, _, stats in dense_walk(model, calib_ids, need="moments", batch_size=batch_size, progress=progress):
        out.append({"o": stats[spec.o], "down": stats[spec.down]})
    return out


def channel_scores(weight: torch.Tensor, stats, metric: str) -> torch.Tensor:
    """Scores (C_in,) of the input channels of `weight` (C_out, C_in) under `metric` (see the module doc),
    computed where the weight is (the statistics follow it) and returned on the CPU."""
    W = weight.detach().double()
    if metric == "magnitude-sp":
        return W.norm(dim=0).cpu()
    if stats is None or stats.ntokens == 0:
        raise ValueError(f"{metric} needs calibration statistics")
    sq_norm = stats.sq_norm.to(W.device)
    if metric == "wanda-sp":
        return (W.abs().mean(0) * sq_norm.sqrt()).cpu()
    if metric == "flap":
        mean = stats.total.to(W.device) / stats.ntokens
        var = (sq_norm / stats.ntokens - mean * mean).clamp_min(0)
        return (var * (W * W).sum(0)).cpu()
    raise UsageError(f"unknown importance metric {metric!r}")


def block_scores(model, block, stats: dict | None, metric: str) -> dict:
    """{"heads": (n_q,) query-head scores, "channels": (intermediate,) MLP channel scores} of one block."""
    spec = struct_spec(model)
    n_q, _, hd = geometry(model, block)
    o = channel_scores(block.get_submodule(spec.o).weight, stats and stats["o"], metric)
    down = channel_scores(block.get_submodule(spec.down).weight, stats and stats["down"], metric)
    return {"heads": o.reshape(n_q, hd).sum(1), "channels": down}
