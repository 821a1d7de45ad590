"""Structured pruning: importance of heads and MLP channels (`importance`), physically shrinking blocks
with GQA respected (`shrink`), and saving models with per-block widths (`io`; loading them is
`sparsellm.models.load_structured`). The entry point is `prune_structured(model, rates, importance, ...)`;
Self-Pruner's search of the rates is in `sparsellm.selfpruner`. Supported families and projection roles come
from the architecture table in `sparsellm.models.arch`."""

from __future__ import annotations

from ..models.arch import get_blocks
from .importance import METRICS, block_scores, check_metric, collect_stats
from .shrink import GQA_MODES, count_params, geometry, plan_block, shrink_block, struct_spec


def importance(model, calib_ids, metric: str = "wanda-sp", batch_size=None, progress: bool = True) -> dict:
    """Everything needed to apply any rate vector later without calibration: per-block head and channel
    scores for `metric`, and the input moments (for FLAP's bias compensation). calib_ids: (nsamples, seqlen);
    magnitude-sp needs none (pass None)."""
    check_metric(metric)
    struct_spec(model)
    stats = collect_stats(model, calib_ids, batch_size, progress) if metric != "magnitude-sp" else None
    blocks = get_blocks(model)
    scores = [block_scores(model, b, stats and stats[i], metric) for i, b in enumerate(blocks)]
    return {"metric": metric, "scores": scores, "stats": stats}


def prune_structured(model, rates: list[float], imp: dict, gqa: str = "query", bias_compensation: bool | None = None) -> dict:
    """Shrink every block i of `model` at rates[i] in place, using importance `imp` (from `importance`).
    bias_compensation: FLAP's (default: on for the flap metric). Returns {"blocks": per-block kept widths,
    "params_before", "params_after"}. Raises UsageError for rates outside [0, 1) or of the wrong length."""
    blocks = get_blocks(model)
    if len(rates) != len(blocks):
        raise ValueError(f"{len(rates)} rates for {len(blocks)} blocks")
    if any(not 0 <= r < 1 for r in rates):
        from ..errors import UsageError

        raise UsageError("structured rates must be in [0, 1)")
    comp = imp["metric"] == "flap" if bias_compensation is None else bias_compensation
    before = count_params(model)
    out = []
    for i, (block, r) in enumerate(zip(blocks, rates)):
        n_q, n_kv, _ = geometry(model, block)
        keep = plan_block(imp["scores"][i], n_q, n_kv, r, gqa)
        shrink_block(model, block, keep, imp["stats"] and imp["stats"][i], comp)
        out.append({"block": i, "rate": r, "heads": len(keep["q"]), "kv_heads": len(keep["kv"]),
                    "intermediate": len(keep["channels"])})
    return {"blocks": out, "params_before": before, "params_after": count_params(model), "gqa": gqa,
            "metric": imp["metric"], "bias_compensation": comp}


__all__ = ["METRICS", "GQA_MODES", "importance", "prune_structured", "plan_block", "shrink_block", "geometry",
           "count_params", "struct_spec"]
