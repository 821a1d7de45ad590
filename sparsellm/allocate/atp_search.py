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
    L = len(get_blocks(model))
    betas = beta_grid(L, target, step)
    t_start = time.perf_counter()
    trials = Trials(model, tokenizer, calib_ids, method, objective, objective_windows, objective_seqlen, options,
                    batch_size, engine, kind, progress)
    bar = tqdm(total=len(betas), desc=f"ATP β search ({strategy})", unit="trial", disable=not progress, leave=False)

    def trial(i: int) -> float:
        obj = trials(atp.allocate(L, target, atp_beta=betas[i]), beta=betas[i])
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
        trials.restore()
    return trials.report(target, L, step, strategy, len(betas), t_start)


class Trials:
    """One trial = prune with given rates from block 0's inputs captured once, score the objective on a few
    held-out windows, restore the dense weights from a copy in memory. Shared by ATP's β search and ATP+DLP's
    joint (β, α) search; `trials` keeps every trial's record."""

    def __init__(self, model, tokenizer, calib_ids, method: str, objective: str, objective_windows: int,
                 objective_seqlen: int, options: dict | None, batch_size: int | None, engine: str,
                 kind: str = "prune", progress: bool = True):
        self.model, self.tokenizer, self.method, self.objective = model, tokenizer, method, objective
        self.windows, self.seqlen, self.options, self.batch_size, self.engine = (
            objective_windows, objective_seqlen, options, batch_size, engine)
        self.blocks = get_blocks(model)
        self.dense = [{n: lin.weight.detach().clone() for n, lin in block_linears(model, b).items()}
                      for b in self.blocks]
        t0 = time.perf_counter()
        if kind == "masks":  # `search` has the details
            from .search import MaskDatabase

            self.db, self.captured = MaskDatabase(model, calib_ids, method, batch_size, progress), None
        else:
            self.db, self.captured = None, capture_inputs(model, calib_ids)
        self.kind, self.setup_seconds = kind, time.perf_counter() - t0
        self.objective_ids = eval_tokens(tokenizer, objective, objective_seqlen)  # tokenized once for all trials
        self.trials: list[dict] = []
        self.last: dict = {}

    def __call__(self, rates: list[float], **record) -> float:
        """The objective (inf for NaN or inf) of the model pruned at `rates`; `record` (β, α) goes into the trial."""
        t0 = time.perf_counter()
        try:
            if self.db is not None:
                self.db.apply(rates)
            else:
                prune_blocks(self.model, None, self.method, rates, options=self.options,
                             batch_size=self.batch_size, progress=False, captured=self.captured, engine=self.engine)
            t_prune = time.perf_counter() - t0
            r = perplexity(self.model, self.tokenizer, self.objective, self.seqlen, self.windows, progress=False,
                           ids=self.objective_ids)
        finally:
            self.restore()
        self.last.update(r)
        obj = r["ppl"] if math.isfinite(r["ppl"]) else float("inf")
        self.trials.append({**record, "rates": rates, "objective": obj, "prune_seconds": t_prune,
                            "seconds": time.perf_counter() - t0, "order": len(self.trials)})
        log.info("trial %s  %s = %.3f  (%.1fs)", " ".join(f"{k} = {v:.4f}" for k, v in record.items()),
                 r["metric"], obj, self.trials[-1]["seconds"])
        return obj

    def restore(self) -> None:
        _restore(self.model, self.blocks, self.dense)

    def report(self, target: float, L: int, step: float, strategy: str, grid_size: int, t_start: float) -> dict:
        """The search report (see `search`). Raises UsageError when every objective is inf or NaN."""
        trials = self.trials
        if not any(math.isfinite(t["objective"]) for t in trials):
            raise UsageError(f"ATP search: every β tried gave an infinite or NaN objective ({len(trials)} of "
                             f"{grid_size} grid points): the pruned model diverges at sparsity {target}, so there is "
                             "no β to choose")
        best = min(trials, key=lambda t: (t["objective"], t["beta"], t.get("alpha", 0.0)))
        return {
            "best_beta": best["beta"], "best_rates": best["rates"], "beta_max": atp.beta_max(L, target),
            "step": step, "strategy": strategy, "grid_size": grid_size,
            "trials": sorted(trials, key=lambda t: (t["beta"], t.get("alpha", 0.0))),
            "objective": {"dataset": self.objective, "windows": min(self.windows, self.last["total_windows"]),
                          "seqlen": self.seqlen, "metric": self.last["metric"],
                          "test_set_selection": self.objective == "wikitext2"},
            "search_seconds": time.perf_counter() - t_start, "setup_seconds": self.setup_seconds,
            "trials_kind": self.kind,
            "one_prune_seconds": trials[0]["prune_seconds"] if self.kind == "prune" else None,
            **({"best_alpha": best["alpha"]} if "alpha" in best else {}),
        }


def fibonacci_trials(n: int) -> int:
    """The most indices `fibonacci_search` scores on a grid of n points: k − 1, F_k the first Fibonacci number
    >= n + 1 (1 for n = 1)."""
    fib = [1, 1, 2]
    while fib[-1] < n + 1:
        fib.append(fib[-1] + fib[-2])
    return max(1, len(fib) - 2)


@no_grad
def search_joint(model, tokenizer, calib_ids: torch.Tensor, method: str, target: float, scores,
                 step: float = 0.002, alpha_max: float = 0.15, objective: str = "c4", objective_windows: int = 8,
                 objective_seqlen: int = 2048, options: dict | None = None, batch_size: int | None = None,
                 progress: bool = True, engine: str = "block", monotone: bool = True, kind: str = "prune") -> dict:
    """ATP+DLP's joint search of β and α (`atp_dlp.allocate`) within ATP's own budget: as many trials as
    `search`'s golden strategy scores at most on the same β grid (T = `fibonacci_trials(n)`). Stage 1: Fibonacci
    search over β at α = 0 (ATP itself) on the grid thinned to every m-th β (β = 0 kept), m the smallest that
    leaves T − 2 trials or fewer (at least 1); stage 2: the k trials left, α = alpha_max·j/k for j = 1..k at
    the chosen β. The best trial wins (objective, then smaller β, then smaller α).

    scores: DLP's block scores U (L,) from the dense model (`dlp.block_scores`). Returns `search`'s report
    (strategy "joint") with "best_alpha", "alpha_max", "budget", "beta_stride" and every trial's "alpha". The
    model is left dense. kind: what a trial scores, as `search`. Raises UsageError as `search`, or for
    alpha_max outside [0, 0.5)."""
    from . import atp_dlp, dlp

    dlp.check_alpha(alpha_max, "ATP+DLP α_max")
    L = len(get_blocks(model))
    betas = beta_grid(L, target, step)
    budget = fibonacci_trials(len(betas))
    stage2 = min(2, budget - 1) if len(betas) > 1 else 0
    m = 1
    while fibonacci_trials(len(betas[::m])) > budget - stage2 and m < len(betas):
        m += 1
    coarse = betas[::m]
    t_start = time.perf_counter()
    trials = Trials(model, tokenizer, calib_ids, method, objective, objective_windows, objective_seqlen, options,
                    batch_size, engine, kind, progress)
    bar = tqdm(total=budget, desc="ATP+DLP (β, α) search", unit="trial", disable=not progress, leave=False)

    def trial(beta: float, alpha: float) -> float:
        obj = trials(atp_dlp.allocate(scores, target, beta, alpha, monotone), beta=beta, alpha=alpha)
        bar.update()
        return obj

    try:
        best_i, _ = fibonacci_search(lambda i: trial(coarse[i], 0.0), len(coarse))
        left = budget - len(trials.trials)
        for j in range(1, left + 1):
            trial(coarse[best_i], alpha_max * j / left)
    finally:
        bar.close()
        trials.restore()
    rep = trials.report(target, L, step, "joint", len(betas), t_start)
    rep.update(alpha_max=alpha_max, budget=budget, beta_stride=m)
    return rep


def _restore(model, blocks, dense):
    for b, saved in zip(blocks, dense):
        for n, lin in block_linears(model, b).items():
            lin.weight.data.copy_(saved[n])
