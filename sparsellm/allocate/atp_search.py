"""ATP's search for the common difference β (Huang et al., ICML 2025, §3.3 and §4; algorithms.md §7.2).

    grid: β = 0, step, 2·step, ... < β_max       # β = 0 is uniform, the baseline
    trial(β): prune with rates s_i = S − β(L−1)/2 + β(i−1)
              objective = perplexity on a few held-out windows
              restore the dense weights
    keep the β with the lowest objective

`strategy="grid"` tries every β (the paper's exhaustive sweep). `strategy="golden"` (the default) runs a
Fibonacci search, golden-section search on the grid's indices (Kiefer 1953; `fibonacci_search`): about
log_φ(n) trials for an n-point grid (5 of 11 at the paper's step 0.002 for 30 blocks at 70%) instead of n.
It returns the grid's own choice whenever the objective falls strictly down to its first lowest point and
never falls after it (ties and plateaus there included); every search recorded in
bench/results/layerwise_*.json is of that shape but one (step 0.002, Wanda 70%: 0.010 scores below
0.012), where it still returns the grid's β (bench/results/atp_search_replay.json). On any other
objective it returns, the same every run, a grid point that no trial beats and whose grid neighbours were
both tried.

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
MAX_TRIALS = 200  # grid points (β values), whatever the strategy
STRATEGIES = ("golden", "grid")
TRIALS = ("prune", "masks")


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
    atp_search: str = setting("golden", "how to search the β grid: golden (golden-section/Fibonacci search on the grid, "
                                        "about log(n) trials; the grid's choice when the objective has one minimum) or "
                                        "grid (try every β, as the paper)", choices=STRATEGIES)
    atp_trials: str = setting("prune", "what a trial scores: prune (a full sequential prune with the pruner, as the "
                                       "paper) or masks (Wanda's or magnitude's masks from one dense pass, applied at "
                                       "the trial's rates: no forward per trial)", choices=TRIALS)

    def validate(self) -> "ATPSearchConfig":
        """Raises UsageError for a bad step, objective or window count (the trial count needs the model's
        depth: `beta_grid` checks it)."""
        check_step(self.atp_step)
        if self.atp_search not in STRATEGIES:
            raise UsageError(f"--atp_search must be one of {', '.join(STRATEGIES)}, got {self.atp_search!r}")
        if self.atp_trials not in TRIALS:
            raise UsageError(f"--atp_trials must be one of {', '.join(TRIALS)}, got {self.atp_trials!r}")
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


def fibonacci_search(score, n: int) -> tuple[int, list[int]]:
    """The index of the lowest score on a grid of n points, scoring as few as it can; returns (best index,
    indices scored in order). score(i) -> float is called at most once per index, never for an index outside
    0..n-1; inf stands for a diverged point (NaN must be mapped to inf by the caller).

    Fibonacci search (Kiefer, "Sequential minimax search for a maximum", 1953): the open bracket (lo, lo + F_k),
    F_k the first Fibonacci number >= n + 1 and lo = -1, points past the grid's end scoring inf unscored; two
    interior points lo + F_{k-2} < lo + F_{k-1}, the bracket shrinks to one side of the worse one (to the left
    on a tie), and the kept point is one of the next two, so each step scores one new index. The kept point
    is the lowest scored so far (ties to the lower index, as the grid's `min(score, β)`), and the bracket's
    ends are scored points or lie outside the grid.

    So on any scores the result is a local minimum of the grid, the same every run: no scored index scores
    lower and both its grid neighbours were scored. When the scores fall strictly down to the first lowest
    one and never fall after it (plateaus and ties at or after the minimum allowed), it is the grid's argmin.
    It scores k − 1 indices or fewer, F_k the first Fibonacci number >= n + 1 (F_0 = F_1 = 1; n = 6: 4 of 6,
    n = 11: 5 of 11, n = 200: 11 of 200). Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"an empty grid (n = {n})")
    seen: dict[int, float] = {}

    def f(i: int) -> float:
        if i >= n:
            return math.inf  # the bracket's padding past β_max: not a grid point
        if i not in seen:
            seen[i] = score(i)
        return seen[i]

    fib = [1, 1, 2]
    while fib[-1] < n + 1:
        fib.append(fib[-1] + fib[-2])
    k, lo = len(fib) - 1, -1
    while k >= 3:  # two interior points, lo + fib[k-2] < lo + fib[k-1]
        x1, x2 = lo + fib[k - 2], lo + fib[k - 1]
        if f(x1) > f(x2):
            lo = x1  # the minimum is right of x1: (x1, lo + fib[k]), of length fib[k-1]
        k -= 1  # else (lo, x2), of length fib[k-1]
    f(lo + 1)  # the one interior point left: the kept one (scored already unless n = 1)
    return lo + 1, list(seen)


@no_grad
def search(model, tokenizer, calib_ids: torch.Tensor, method: str, target: float, step: float = 0.002,
           objective: str = "c4", objective_windows: int = 8, objective_seqlen: int = 2048,
           options: dict | None = None, batch_size: int | None = None, progress: bool = True,
           strategy: str = "golden", engine: str = "block", kind: str = "prune") -> dict:
    """Search `beta_grid` with pruner `method` at mean sparsity `target` and return the report:
    {"best_beta", "best_rates", "beta_max", "step", "strategy", "grid_size", "trials": [{"beta", "rates",
    "objective", "prune_seconds", "seconds", "order"}] (the trials run, by β; `order` counts from 0 in the
    order they ran), "objective": {"dataset", "windows", "seqlen", "metric", "test_set_selection"},
    "search_seconds", "one_prune_seconds" (the first trial's prune time)}. The model is left dense (its
    weights restored).

    calib_ids: (nsamples, seqlen) calibration windows. objective: "c4" (validation, default) or
    "wikitext2" (test-set selection). strategy: "golden" (`fibonacci_search`: about log_φ of the grid's size
    trials) or "grid" (every β, the paper's sweep). engine: the trials' engine ("block" or "single",
    `engine.prune_blocks`). kind: "prune" (each trial prunes the model with `method`, sequentially, as the
    paper) or "masks" (one dense pass builds `search.MaskDatabase`, Wanda's masks for wanda and sparsegpt,
    magnitude's for magnitude; each trial applies them at its rates: only the objective's forward per trial,
    a proxy of the final prune like EvoPress's database). Raises UsageError for a bad step, strategy, trials
    or window count, and when every trial's objective is inf or NaN (the pruned model diverges)."""
    if objective_windows < 1:
        raise UsageError(f"--objective_windows must be >= 1, got {objective_windows}")
    if strategy not in STRATEGIES:
        raise UsageError(f"--atp_search must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if kind not in TRIALS:
        raise UsageError(f"--atp_trials must be one of {', '.join(TRIALS)}, got {kind!r}")
    blocks = get_blocks(model)
    L = len(blocks)
    betas = beta_grid(L, target, step)
    t_start = time.perf_counter()
    dense = [{n: lin.weight.detach().clone() for n, lin in block_linears(model, b).items()} for b in blocks]
    if kind == "masks":
        from .search import MaskDatabase

        db, captured = MaskDatabase(model, calib_ids, method, batch_size, progress), None
    else:
        db, captured = None, capture_inputs(model, calib_ids)
    setup_seconds = time.perf_counter() - t_start
    objective_ids = eval_tokens(tokenizer, objective, objective_seqlen)  # tokenized once for all trials
    trials, last = [], {}
    bar = tqdm(total=len(betas), desc=f"ATP β search ({strategy})", unit="trial", disable=not progress, leave=False)

    def trial(i: int) -> float:
        beta = betas[i]
        t0 = time.perf_counter()
        rates = atp.allocate(L, target, atp_beta=beta)
        try:
            if db is not None:
                db.apply(rates)
            else:
                prune_blocks(model, None, method, rates, options=options, batch_size=batch_size, progress=False,
                             captured=captured, engine=engine)
            t_prune = time.perf_counter() - t0
            r = perplexity(model, tokenizer, objective, objective_seqlen, objective_windows, progress=False,
                           ids=objective_ids)
        finally:
            _restore(model, blocks, dense)
        last.update(r)
        obj = r["ppl"] if math.isfinite(r["ppl"]) else float("inf")
        trials.append({"beta": beta, "rates": rates, "objective": obj, "prune_seconds": t_prune,
                       "seconds": time.perf_counter() - t0, "order": len(trials)})
        log.info("ATP β = %.4f  %s = %.3f  (%.1fs)", beta, r["metric"], obj, trials[-1]["seconds"])
        bar.update()
        return obj

    try:
        if strategy == "grid":
            for i in range(len(betas)):
                trial(i)
        else:
            fibonacci_search(trial, len(betas))
    finally:
        bar.close()
        _restore(model, blocks, dense)
    if not any(math.isfinite(t["objective"]) for t in trials):
        raise UsageError(f"ATP search: every β tried gave an infinite or NaN objective ({len(trials)} of "
                         f"{len(betas)} grid points): the pruned model diverges at sparsity {target}, so there is "
                         "no β to choose")
    best = min(trials, key=lambda t: (t["objective"], t["beta"]))
    return {
        "best_beta": best["beta"], "best_rates": best["rates"], "beta_max": atp.beta_max(L, target), "step": step,
        "strategy": strategy, "grid_size": len(betas),
        "trials": sorted(trials, key=lambda t: t["beta"]),
        "objective": {"dataset": objective, "windows": min(objective_windows, last["total_windows"]),
                      "seqlen": objective_seqlen, "metric": last["metric"],
                      "test_set_selection": objective == "wikitext2"},
        "search_seconds": time.perf_counter() - t_start, "setup_seconds": setup_seconds, "trials_kind": kind,
        "one_prune_seconds": trials[0]["prune_seconds"] if kind == "prune" else None,
    }


def _restore(model, blocks, dense):
    for b, saved in zip(blocks, dense):
        for n, lin in block_linears(model, b).items():
            lin.weight.data.copy_(saved[n])
