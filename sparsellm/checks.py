"""Nothing lost, nothing silent: non-finite numbers stop a run with one line that names where they are, and
a catastrophic loss of quality is a warning that names the block and the likely cause.

Non-finite numbers raise `NonFiniteError` (one line, exit status 2, nothing written):
  - `check_weights(model)`: every parameter, before any calibration (`pipeline.validate_for_model`,
    `runs.eval`), e.g. `model.layers.3.mlp.down_proj: weight has 2 NaN/inf values`;
  - `check_stats(prefix, stats)`: each linear's calibration statistics (input norms, Hessian), as soon as a
    block's are gathered (`engine`): activations that overflowed, before any pruner or damping sees them;
  - `engine` checks every pruned weight the same way, and `evaluate.perplexity` a window's loss.

Quality warnings (strings; the runs log them to stderr, put them in the run record's `warnings` list, and
the text reports show them). The thresholds, chosen from SmolLM2-135M's measured runs (BENCHMARKS.md §5):
  - `ppl_warnings`: a perplexity above PPL_FACTOR = 10× the dense model's on the same metric (when the dense
    model was evaluated: `--eval_dense`), else above the vocabulary size (worse than a uniform guess). On
    SmolLM2 (first 16 WikiText-2 windows, dense 20.74) Wanda and SparseGPT give 2.0–5.9× dense at 50–60%
    sparsity (a small model loses more than the papers' 7B ones) and 9.8× (SparseGPT, ATP) to 53× (Wanda,
    uniform) at 70%; magnitude 80% gave 4,300×. Non-finite perplexity is always flagged.
  - `block_warnings`: the cumulative reconstruction error (`engine.prune_blocks`, `cum_error`) of a block
    at least CUM_JUMP = 2× the previous block's and at least CUM_FLOOR = 0.25, or reaching CUM_LOST = 1
    (the pruned model's hidden states then differ from the dense model's by more than their own norm).
    In every measured run of §5 the largest block-to-block factor was 1.6× (at block 28, where SmolLM2's
    hidden states change scale) and the cumulative error stayed below 1 except Wanda 70% OWL (1.01, 26×
    dense perplexity). The likely cause is the block's own pruning when its local error is at least
    LOCAL_CAUSE = 0.5, else the earlier blocks' error amplified there, naming the first block that already
    had half of it (magnitude 80% on SmolLM2: 1.10 at block 28, but 0.74 at block 0 already).
"""

from __future__ import annotations

import math

from .errors import NonFiniteError
from .lazy import lazy_import

torch = lazy_import("torch")

PPL_FACTOR = 10.0
CUM_JUMP = 2.0
CUM_FLOOR = 0.25
CUM_LOST = 1.0
LOCAL_CAUSE = 0.5


def count_nonfinite(t: torch.Tensor) -> int:
    """The number of NaN and ±inf entries of `t`."""
    return int(t.numel() - int(torch.isfinite(t).sum()))


def check_tensor(t: torch.Tensor, where: str, what: str) -> None:
    """Raise NonFiniteError("{where}: {what} has N NaN/inf values") if `t` holds any."""
    n = count_nonfinite(t)
    if n:
        raise NonFiniteError(f"{where}: {what} has {n} NaN/inf value{'s' * (n != 1)}")


def check_weights(model) -> None:
    """Every parameter of `model` finite, else NonFiniteError naming the module and the parameter. Weights
    not loaded yet (a lazy model's blocks, on the meta device) are checked by the engine when they are."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        module, _, param = name.rpartition(".")
        check_tensor(p.detach(), module or name, param)


_STATS = (("sq_norm", "input norms"), ("hessian", "input Hessian"), ("total", "input sums"))


def check_stats(prefix: str, stats: dict) -> None:
    """Every linear's calibration statistics ({name: LayerStats} of the block named `prefix`, e.g.
    `model.layers.3`) finite, else NonFiniteError naming the linear: its inputs overflowed."""
    seen = set()
    for name, st in stats.items():
        if st is None or id(st) in seen:
            continue
        seen.add(id(st))
        for attr, label in _STATS:
            t = getattr(st, attr, None)
            if t is not None and count_nonfinite(t):
                raise NonFiniteError(f"{prefix}.{name}: calibration statistics ({label}) have {count_nonfinite(t)} "
                                     "NaN/inf values: the block's inputs are not finite (activations overflow; "
                                     "with --dtype bfloat16 try float32)")


def block_warnings(blocks: list[dict]) -> list[str]:
    """Warnings for the blocks (a prune report's `blocks`: block, target, rel_error, cum_error) where the
    cumulative reconstruction error explodes (see the module docstring for the thresholds)."""
    out, prev, run = [], None, []
    for b in blocks:
        c = b.get("cum_error")
        if c is None:
            prev, run = None, []
            continue
        run.append(b)
        jumped = prev is not None and c >= CUM_FLOOR and c >= CUM_JUMP * prev
        lost = c >= CUM_LOST and (prev is None or prev < CUM_LOST)
        if jumped or lost:
            what = (f"jumps from {prev:.3g} (block {b['block'] - 1}) to {c:.3g}"
                    + (f", {c / prev:.1f}× (threshold {CUM_JUMP:g}×)" if prev > 0 else "") if jumped else
                    f"reaches {c:.3g} (≥ {CUM_LOST:g}: the hidden states are further from the dense model's than "
                    "their own norm)")
            out.append(f"block {b['block']}: the cumulative reconstruction error {what}; {_block_cause(run)}")
        prev = c
    return out


def _block_cause(run: list[dict]) -> str:
    """The likely cause of the error at run[-1], given the blocks before it (run[:-1])."""
    b = run[-1]
    local = b.get("rel_error")
    if local is not None and local >= LOCAL_CAUSE:
        return (f"likely cause: this block's own pruning (local error {local:.3g} at sparsity {b['target']:.3g}): "
                "give it less sparsity (a lower target, --allocation owl/atp or file:rates.json)")
    parts = [] if local is None else [f"its local error is only {local:.3g}"]
    origin = next(o for o in run if o["cum_error"] >= b["cum_error"] / 2)
    if origin is not b:
        lo = origin.get("rel_error")
        parts.append(f"half of it was already there at block {origin['block']} ({origin['cum_error']:.3g}"
                     + ("" if lo is None else f", local error {lo:.3g}") + ")")
    shown = f" ({'; '.join(parts)})" if parts else ""
    return (f"likely cause: the earlier blocks' error amplified here{shown}: prune the earlier blocks less "
            "(--allocation atp, or a lower target)")


def ppl_warnings(metrics: dict, metrics_dense: dict, vocab_size: int | None, prune_report: dict | None) -> list[str]:
    """Warnings for perplexities (`metrics`, {name: {"ppl", ...}}) far above the dense model's
    (`metrics_dense`, same names; may be empty) or, with no dense value, above `vocab_size`; a non-finite
    perplexity is always a warning. `prune_report` (method, target, blocks) names the likely cause."""
    out = []
    for key, r in metrics.items():
        if key == "zeroshot" or not isinstance(r, dict) or "ppl" not in r:
            continue
        ppl, dense = r["ppl"], (metrics_dense.get(key) or {}).get("ppl")
        if dense:
            ratio = ppl / dense
            if math.isfinite(ratio) and ratio <= PPL_FACTOR:
                continue
            what = (f"{key} {ppl:,.4g} is {ratio:,.0f}× the dense model's {dense:,.4g} (threshold {PPL_FACTOR:g}×)"
                    if math.isfinite(ratio) else f"{key} is {ppl} (dense {dense:,.4g})")
        elif not math.isfinite(ppl) or (vocab_size and ppl > vocab_size):
            what = (f"{key} {ppl:,.6g} is above the vocabulary size {vocab_size:,}, worse than a uniform guess"
                    if math.isfinite(ppl) else f"{key} is {ppl}")
        else:
            continue
        out.append(f"{what}: the pruned model has lost most of its quality; {_ppl_cause(prune_report)}")
    return out


def _ppl_cause(p: dict | None) -> str:
    if not p:
        return "likely cause: the pruning"
    exploded = [w.split(":")[0] for w in p.get("warnings", [])]
    where = f" (see the warning for {exploded[0]})" if exploded else ""
    return (f"likely cause: sparsity {p['target_sparsity']:.3g} ({p['sparsity_type']}) is too high for {p['method']} "
            f"on this model{where}: a lower sparsity, a calibrated pruner (wanda, sparsegpt) or a non-uniform "
            "allocation")
