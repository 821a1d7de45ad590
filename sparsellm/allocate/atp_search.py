"""ATP's search for the common difference β (Huang et al., ICML 2025, §3.3 and §4; algorithms.md §7.2).

    for β in 0, step, 2·step, ... < β_max:      # β = 0 is uniform, the baseline
        prune with rates s_i = S − β(L−1)/2 + β(i−1)
        objective = perplexity on a few held-out windows
        restore the dense weights
    keep the β with the lowest objective

Cheap by construction: block 0's calibration inputs are captured once and reused by every trial, the
dense weights are restored from a copy in memory (no reload), and the objective is a small fixed window
subset. The default objective is C4 validation, disjoint from both the calibration windows (C4 train
documents) and the final WikiText-2 test. `objective="wikitext2"` scores on the test itself, as the
released code does; the report then says `test_set_selection: true`.
"""

from __future__ import annotations

import logging
import math
import time

from tqdm.auto import tqdm

from dataclasses import dataclass

from ..config import setting
from ..data import eval_tokens
from ..engine import capture_inputs, prune_blocks
from ..errors import UsageError
from ..evaluate import perplexity
from ..lazy import lazy_import, no_grad
from ..models import block_linears, get_blocks
from . import atp

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")
MAX_TRIALS = 200


@dataclass
class ATPSearchConfig:
    """The β search: grid step, objective ("c4" validation, held out; "wikitext2" is test-set selection, as
    ATP's released code does), windows scored per β and their length (None: the evaluation's)."""

    atp_step: float = setting(0.002, "ATP search grid step (paper: 0.002)")
    objective: str = setting("c4", "search objective: c4 validation windows (held out), or wikitext2 test windows "
                                   "(what ATP's released code does; flagged as test-set selection in the report)",
                             choices=("c4", "wikitext2"))
    objective_windows: int = setting(8, "windows scored per β")
    objective_seqlen: int | None = setting(None, "window length of the objective (default: --eval_seqlen)")

    def validate(self) -> "ATPSearchConfig":
        """Raises UsageError for a bad step, objective or window count (the trial count needs the model's
        depth: `beta_grid` checks it)."""
        check_step(self.atp_step)
        if self.objective not in ("c4", "wikitext2"):
            raise UsageError(f"--objective must be c4 or wikitext2, got {self.objective!r}")
        if self.objective_windows < 1:
            raise UsageError(f"--objective_windows must be >= 1, got {self.objective_windows}")
        if self.objective_seqlen is not None and self.objective_seqlen < 2:
            raise UsageError(f"--objective_seqlen must be >= 2, got {self.objective_seqlen}")
        return self


def check_step(step: float) -> None:
    """Raises UsageError unless the grid step is a finite number > 0 (the trial count needs the model's depth:
    beta_grid checks it)."""
    if not (step > 0 and math.isfinite(step)):
        raise UsageError(f"--atp_step must be a finite number > 0, got {step}")


def beta_grid(num_blocks: int, target: float, step: float = 0.002) -> list[float]:
    """0, step, 2·step, ... up to β_max, leaving out a β_max that would make the last block fully sparse.
    Raises UsageError for step <= 0 or a grid of more than MAX_TRIALS βs."""
    check_step(step)
    bmax = atp.beta_max(num_blocks, target)
    grid = []
    k = 0
    while k * step <= bmax + 1e-12:
        beta = min(round(k * step, 12), bmax)
        try:
            atp.allocate(num_blocks, target, atp_beta=beta)
        except UsageError:  # only β_max itself can fail: the last block would be fully sparse
            break
        grid.append(beta)
        if len(grid) > MAX_TRIALS:  # stop early: a tiny step would take forever to enumerate
            raise UsageError(f"--atp_step {step:g} gives more than {MAX_TRIALS} trials (about {bmax / step + 1:.3g}; "
                             f"β_max = {bmax:.6f}); use a step of at least {bmax / (MAX_TRIALS - 1):.2e}")
        k += 1
    return grid


@no_grad
def search(model, tokenizer, calib_ids: torch.Tensor, method: str, target: float, step: float = 0.002,
           objective: str = "c4", objective_windows: int = 8, objective_seqlen: int = 2048,
           options: dict | None = None, batch_size: int | None = None, progress: bool = True) -> dict:
    """Try every β of `beta_grid` with pruner `method` at mean sparsity `target` and return the report:
    {"best_beta", "best_rates", "trials": [{"beta", "rates", "objective", "prune_seconds", "seconds"}],
    "objective": {"dataset", "windows", "seqlen", "test_set_selection"}, "search_seconds",
    "one_prune_seconds" (the β = 0 trial's prune time)}. The model is left dense (its weights restored).

    calib_ids: (nsamples, seqlen) calibration windows. objective: "c4" (validation, default) or
    "wikitext2" (test-set selection). Raises UsageError for a bad step or window count, and when every
    trial's objective is inf or NaN (the model diverges at this sparsity for every β)."""
    if objective_windows < 1:
        raise UsageError(f"--objective_windows must be >= 1, got {objective_windows}")
    blocks = get_blocks(model)
    L = len(blocks)
    betas = beta_grid(L, target, step)
    t_start = time.perf_counter()
    dense = [{n: lin.weight.detach().clone() for n, lin in block_linears(model, b).items()} for b in blocks]
    captured = capture_inputs(model, calib_ids)
    objective_ids = eval_tokens(tokenizer, objective, objective_seqlen)  # tokenized once for all trials
    trials = []
    try:
        for beta in tqdm(betas, desc="ATP β search", unit="trial", disable=not progress, leave=False):
            t0 = time.perf_counter()
            rates = atp.allocate(L, target, atp_beta=beta)
            prune_blocks(model, None, method, rates, options=options, batch_size=batch_size, progress=False,
                         captured=captured)
            t_prune = time.perf_counter() - t0
            r = perplexity(model, tokenizer, objective, objective_seqlen, objective_windows, progress=False,
                           ids=objective_ids)
            obj = r["ppl"] if math.isfinite(r["ppl"]) else float("inf")
            trials.append({"beta": beta, "rates": rates, "objective": obj, "prune_seconds": t_prune,
                           "seconds": time.perf_counter() - t0})
            log.info("ATP β = %.4f  %s = %.3f  (%.1fs)", beta, r["metric"], obj, trials[-1]["seconds"])
            _restore(model, blocks, dense)
    finally:
        _restore(model, blocks, dense)
    if not any(math.isfinite(t["objective"]) for t in trials):
        raise UsageError(f"ATP search: every β gave an infinite or NaN objective ({len(trials)} trials): the pruned "
                         f"model diverges at sparsity {target}, so there is no β to choose")
    best = min(trials, key=lambda t: (t["objective"], t["beta"]))
    return {
        "best_beta": best["beta"], "best_rates": best["rates"], "beta_max": atp.beta_max(L, target), "step": step,
        "trials": trials,
        "objective": {"dataset": objective, "windows": min(objective_windows, r["total_windows"]),
                      "seqlen": objective_seqlen, "metric": r["metric"],
                      "test_set_selection": objective == "wikitext2"},
        "search_seconds": time.perf_counter() - t_start,
        "one_prune_seconds": trials[0]["prune_seconds"],
    }


def _restore(model, blocks, dense):
    for b, saved in zip(blocks, dense):
        for n, lin in block_linears(model, b).items():
            lin.weight.data.copy_(saved[n])
