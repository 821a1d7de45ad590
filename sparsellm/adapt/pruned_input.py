"""An input model that is already pruned: fine-tuning keeps its masks and per-block rates, never re-prunes it.

    inp = pruned_input(model, read_sidecar(model_dir))       # None: a dense model
    S = resolve_target(requested_S, requested_type, inp)     # the input's S; UsageError for another one

A model counts as pruned when its block linears are at least `PRUNED_MIN` sparse (exact zeros, measured on the
loaded weights; a dense model, even one de-quantized from a GGUF, has far fewer). What it was pruned to comes
from its `sparsity_config.json` sidecar (`pipeline.sparsity_sidecar`, written next to every model sparsellm
saves: the target S, the pattern, the allocation and its per-block rates) when that agrees with the weights,
else from the weights themselves (S = the measured sparsity, rates = each block's measured sparsity).

Asking for another sparsity than the input's is refused (`resolve_target`): fine-tuning cannot give back pruned
weights, and pruning a pruned model again to a new S would silently replace its allocation. Leaving the target
out fine-tunes at the input's own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine import linear_sparsity
from ..errors import UsageError
from ..models import block_linears, get_blocks
from ..prune import parse_pattern

log = logging.getLogger("sparsellm")

SIDECAR = "sparsity_config.json"
PRUNED_MIN = 0.1  # measured fraction of exact zeros in the block linears from which a model counts as pruned
SIDECAR_TOL = 1e-3  # |sidecar global_sparsity − measured| within which the sidecar describes the loaded weights
MEASURED_TOL = 0.01  # |requested S − measured| accepted without a sidecar (per-row floors land a little below S)


@dataclass
class PrunedInput:
    """What an already-pruned input model was pruned to. source: "sidecar" or "measured"; method: its pruning
    method ("measured" without a sidecar); target: its S; sparsity_type: "unstructured" or "N:M"; allocation:
    {"name", "rates" (one per block), ...} (the sidecar's, or {"name": "measured", "rates": measured per
    block}); measured: the loaded weights' linear sparsity; block_measured: per block."""

    source: str
    method: str
    target: float
    sparsity_type: str
    allocation: dict
    measured: float
    block_measured: list

    @property
    def rates(self) -> list[float]:
        return list(self.allocation["rates"])

    def describe(self) -> str:
        if self.source == "measured":
            pattern = "" if self.sparsity_type == "unstructured" else f", every group {self.sparsity_type}"
            return (f"measured from the weights: {self.measured:.4f} sparse, per block "
                    f"{min(self.rates):.4f} to {max(self.rates):.4f}{pattern}")
        return (f"{self.method}, {self.allocation['name']} allocation, {self.sparsity_type} target {self.target:.4f}, "
                f"measured {self.measured:.4f}, from its {SIDECAR}")

    def to_dict(self) -> dict:
        return {"pruned": True, "kept": True, **asdict(self)}


def read_sidecar(model_dir) -> dict | None:
    """The sidecar next to a model (None: no local directory, or no sidecar). Raises UsageError for one
    that is not a JSON object with target_sparsity, sparsity_structure and allocation.rates."""
    if model_dir is None or not (Path(model_dir) / SIDECAR).is_file():
        return None
    path = Path(model_dir) / SIDECAR
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(d, dict) and isinstance(d["target_sparsity"], (int, float)) \
            and isinstance(d["sparsity_structure"], str) and isinstance(d["allocation"]["rates"], list)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UsageError(f"{path} is not a sparsellm sparsity sidecar (target_sparsity, sparsity_structure, "
                         "allocation.rates): fix or remove it")
    return d


def from_sidecar(sidecar: dict | None) -> PrunedInput | None:
    """The input as its sidecar describes it, before the model is loaded (None: no sidecar, or one whose
    saved weights were not pruned, e.g. after plain LoRA made them dense again)."""
    if sidecar is None or float(sidecar.get("global_sparsity") or 0.0) < PRUNED_MIN:
        return None
    g = float(sidecar["global_sparsity"])
    return PrunedInput("sidecar", str(sidecar.get("method", "unknown")), float(sidecar["target_sparsity"]),
                       sidecar["sparsity_structure"], dict(sidecar["allocation"]), g, [])


def block_sparsity(model) -> list[float]:
    """Fraction of exact zeros in each decoder block's linears, one per block."""
    out = []
    for block in get_blocks(model):
        lins = block_linears(model, block).values()
        out.append(sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins))
    return out


def measured_pattern(model, measured: float) -> str:
    """"N:M" when every block linear has at most N non-zeros in each group of M consecutive inputs (M = 4,
    then 8; the smallest such N) and the measured sparsity is that pattern's 1 − N/M (within MEASURED_TOL),
    else "unstructured". Weight (C_out, C_in) with C_in divisible by M."""
    lins = [lin for block in get_blocks(model) for lin in block_linears(model, block).values()]
    for m in (4, 8):
        if any(lin.in_features % m for lin in lins):
            continue
        n = max(int((lin.weight.detach().reshape(lin.out_features, -1, m) != 0).sum(-1).max()) for lin in lins)
        if n < m and abs(1 - n / m - measured) <= MEASURED_TOL:
            return f"{n}:{m}"
    return "unstructured"


def pruned_input(model, sidecar: dict | None = None) -> PrunedInput | None:
    """What the loaded `model` was pruned to, or None when it is dense (< PRUNED_MIN zeros). The sidecar is
    used when it matches the weights (its global sparsity, its number of blocks); otherwise the weights'
    measured per-block sparsity, with a warning when a sidecar was there."""
    measured, blocks = linear_sparsity(model)["sparsity"], block_sparsity(model)
    if measured < PRUNED_MIN:
        if from_sidecar(sidecar) is not None:
            log.warning("%s says %.4f sparse but the weights are %.4f sparse: treated as dense", SIDECAR,
                        sidecar["global_sparsity"], measured)
        return None
    inp = from_sidecar(sidecar)
    if inp is not None and abs(inp.measured - measured) <= SIDECAR_TOL and len(inp.rates) == len(blocks):
        inp.measured, inp.block_measured = measured, blocks
        return inp
    if sidecar is not None:
        log.warning("%s does not describe these weights (%.4f sparse): using the measured per-block sparsity",
                    SIDECAR, measured)
    return PrunedInput("measured", "measured", measured, measured_pattern(model, measured),
                       {"name": "measured", "rates": blocks}, measured, blocks)


def resolve_target(requested: float | None, sparsity_type: str, inp: PrunedInput) -> float:
    """The fine-tuning target for an already-pruned input: its own S when `requested` is None (left out);
    `requested` when it is the input's (sidecar: within 1e-6; measured: within MEASURED_TOL). `sparsity_type`
    must be "unstructured" (the default: any mask is kept as it is) or the input's own N:M pattern. Raises
    UsageError for anything else, before any work."""
    nm, have = parse_pattern(sparsity_type), parse_pattern(inp.sparsity_type)
    what = f"already pruned ({inp.describe()})"
    if nm is not None and nm != have:
        raise UsageError(f"the input model is {what}; --sparsity_type {sparsity_type} differs: fine-tuning keeps "
                         "its masks (leave --sparsity_type out, or prune the dense model to that pattern)")
    if requested is None:
        return nm.sparsity if nm is not None else inp.target
    tol = 1e-6 if inp.source == "sidecar" else MEASURED_TOL
    if abs(float(requested) - inp.target) > tol:
        raise UsageError(f"the input model is {what}; --sparsity_ratio {requested:g} differs: fine-tuning keeps "
                         "its masks and rates (leave --sparsity_ratio out, or prune the dense model to that "
                         "sparsity first)")
    return inp.target


__all__ = ["PRUNED_MIN", "PrunedInput", "read_sidecar", "from_sidecar", "block_sparsity", "pruned_input",
           "resolve_target"]
