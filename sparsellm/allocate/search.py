"""Searched per-block sparsities: Self-Pruner's search loops (the GA of `selfpruner.ga`, or the EvoPress-style
(1+λ) search of `selfpruner.evopress`) driving an unstructured rate vector instead of structured rates
(issue 22, "one search engine for any per-layer rate vector"; EvoPress, ICML 2025, §3–4, for the database).

    database: one dense pass over the calibration windows (Wanda's ‖X_j‖ per linear, as OWL's pre-pass);
              every linear's entries sorted once by its score (Wanda |W|·‖X‖ per row; magnitude |W| per matrix)
    candidate rates s (mean S, each within S ± λ): the lowest floor(C_in · s_i) scores of every row of block i
              are zeroed (masks of the dense model's statistics, as EvoPress's database of dense propagation)
    fitness:  perplexity on held-out C4-validation windows (never the WikiText-2 test); dense weights restored
    search:   x = s − (S − λ) in [0, 2λ] with mean λ, by the chosen loop, at a budget of fitness evaluations

The final prune uses these rates with the real engine (sequential, the pruner's own statistics), so the
search ranks rate vectors with a cheap proxy of the final model, like EvoPress's. SparseGPT is searched with
Wanda's masks (no weight update; `info["masks"]` says so). The search's cost: one dense pass plus `budget`
evaluations of `search_windows` × `search_seqlen` tokens.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..registry import register

torch = lazy_import("torch")
log = logging.getLogger("sparsellm")
LOOPS = ("evopress", "ga")


@dataclass
class RateSearchConfig:
    """The search of per-block rates: its loop, its budget of fitness evaluations, the band S ± λ of every
    rate, and the held-out fitness (C4-validation windows of search_seqlen tokens)."""

    search_loop: str = setting("evopress", "searched rates: the search loop (evopress or ga)", choices=LOOPS)
    search_budget: int = setting(60, "searched rates: fitness evaluations")
    search_lambda: float | None = setting(None, "searched rates: every rate stays within S ± λ (default: "
                                                "min(0.2, 0.9·min(S, 1 − S)))")
    search_windows: int = setting(4, "searched rates: C4-validation windows per fitness")
    search_seqlen: int = setting(512, "searched rates: tokens per fitness window")
    search_seed: int = setting(0, "searched rates: seed of the search")

    def validate(self, target: float) -> "RateSearchConfig":
        if self.search_loop not in LOOPS:
            raise UsageError(f"--search_loop must be one of {', '.join(LOOPS)}, got {self.search_loop!r}")
        if self.search_budget < 9:
            raise UsageError(f"--search_budget must be >= 9 fitness evaluations, got {self.search_budget}")
        if self.search_lambda is None:
            self.search_lambda = min(0.2, 0.9 * min(target, 1 - target)) if target > 0 else 0.0
        if not (0 < self.search_lambda <= target and target + self.search_lambda < 1):
            raise UsageError(f"--search_lambda must be in (0, S] with S + λ < 1 (and S > 0) at sparsity {target}, got "
                             f"{self.search_lambda}")
        if self.search_windows < 1 or self.search_seqlen < 2:
            raise UsageError("--search_windows must be >= 1 and --search_seqlen >= 2")
        return self


def loop_settings(config: RateSearchConfig):
    """(SearchConfig, operators) of the loop at the budget: a population of 8, 4 crossover and 4 mutation
    children per generation for the GA (the EvoPress loop takes the same budget, `EvoPress.search`: 16
    offspring, survivors 4, 2, 1 on a quarter, a half and all of the fitness windows, 8 levels of λ/8 each
    side, so that the levels span the band)."""
    from ..selfpruner.evolution import SearchConfig
    from ..selfpruner.evopress import EvoPress, EvoPressConfig
    from ..selfpruner.ga import GAOperators

    lam = config.search_lambda
    s = SearchConfig(target_rate=lam, max_rate=2 * lam, population=8, generations=(config.search_budget - 8) // 8,
                     crossover=4, mutation=4, seed=config.search_seed, decimals=4)
    if config.search_loop == "ga":
        return s, GAOperators(sigma_init=lam / 2, sigma=lam / 4)
    windows = ",".join(str(max(1, round(config.search_windows * f))) for f in (0.25, 0.5, 1))
    return s, EvoPress(EvoPressConfig(evo_offspring=16, evo_survivors="4,2,1", evo_windows=windows, evo_levels=8,
                                      evo_step=lam / 8, evo_pool=16 * config.search_windows))


class MaskDatabase:
    """Every block linear's entries in the order they are pruned, from one dense pass: `apply(rates)` zeroes
    the lowest floor(C_in · rate) of each row (Wanda) or floor(numel · rate) of the matrix (magnitude), from
    the dense weights kept here; `restore()` puts the dense weights back. Memory: one index (int16 when
    C_in < 2^15, else int32) and one dense copy per weight."""

    @no_grad
    def __init__(self, model, calib_ids, method: str, batch_size=None, progress=True):
        from ..engine import dense_walk
        from ..models import block_linears, get_blocks
        from ..prune import wanda

        self.per_row = method != "magnitude"
        self.linears, self.dense, self.order = [], [], []
        if self.per_row:
            walk = ((b, stats) for _, b, _, stats in dense_walk(model, calib_ids, need="norm", batch_size=batch_size,
                                                                progress=progress))
        else:
            walk = ((b, None) for b in get_blocks(model))
        for block, stats in walk:
            lins = block_linears(model, block)
            self.linears.append(list(lins.values()))
            self.dense.append([lin.weight.detach().clone() for lin in lins.values()])
            orders = []
            for n, lin in lins.items():
                w = lin.weight.float()
                if self.per_row:
                    idx = torch.sort(wanda.scores(w, stats[n]), dim=1, stable=True).indices
                else:
                    idx = torch.sort(w.abs().flatten(), stable=True).indices
                small = (idx.shape[-1] if self.per_row else idx.numel()) < 2**15
                orders.append(idx.to(torch.int16 if small else torch.int32))
            self.order.append(orders)

    @no_grad
    def apply(self, rates) -> None:
        for lins, dense, orders, rate in zip(self.linears, self.dense, self.order, rates):
            for lin, w, idx in zip(lins, dense, orders):
                lin.weight.copy_(w)
                k = int(idx.shape[-1] * rate)
                if not k:
                    continue
                if self.per_row:
                    lin.weight.scatter_(1, idx[:, :k].long(), 0.0)
                else:
                    lin.weight.view(-1)[idx[:k].long()] = 0.0

    @no_grad
    def restore(self) -> None:
        for lins, dense in zip(self.linears, self.dense):
            for lin, w in zip(lins, dense):
                lin.weight.copy_(w)


@register("allocator", "search", RateSearchConfig, needs="data")
def rates_for_model(model, calib_ids, target: float, config: RateSearchConfig, *, prune_method: str = "wanda",
                    batch_size=None, progress=True, tokenizer=None, **_):
    """Searched per-block rates (mean `target`, each within target ± λ) and the report: loop, budget, evals,
    fitness of the uniform and of the best vector, history, seconds. calib_ids: (nsamples, seqlen)
    calibration windows of the database; tokenizer: for the C4-validation fitness. Raises UsageError without
    a tokenizer, for N:M-free methods other than magnitude, wanda and sparsegpt, or when every candidate's
    fitness is inf."""
    from ..data import eval_tokens
    from ..evaluate import perplexity
    from ..models import context_length, get_blocks
    from . import check_rates

    config.validate(target)
    if tokenizer is None:
        raise UsageError("--allocation search scores candidates on C4-validation text: it needs the tokenizer")
    if prune_method not in ("magnitude", "wanda", "sparsegpt"):
        raise UsageError(f"--allocation search supports magnitude, wanda and sparsegpt, not {prune_method}")
    t0 = time.perf_counter()
    seqlen = min(config.search_seqlen, context_length(model))
    c4 = eval_tokens(tokenizer, "c4", seqlen)
    L, lam = len(get_blocks(model)), config.search_lambda
    db = MaskDatabase(model, calib_ids, prune_method, batch_size, progress)
    t_db = time.perf_counter() - t0

    def fitness(x, windows=None):
        db.apply([r + target - lam for r in x])
        ids = c4 if windows is None else torch.cat([c4[:, w * seqlen:(w + 1) * seqlen] for w in windows], 1)
        n = config.search_windows if windows is None else len(windows)
        ppl = perplexity(model, tokenizer, "c4", seqlen, n, progress=False, ids=ids)["ppl"]
        return ppl if math.isfinite(ppl) else math.inf

    s, ops = loop_settings(config)
    budget = s.population + s.generations * (s.crossover + s.mutation)
    if hasattr(ops, "search"):
        pool, w = c4.shape[1] // seqlen, [int(x) for x in ops.config.evo_windows.split(",")]
        if ops.config.evo_pool > pool:
            raise UsageError(f"--search_windows {config.search_windows} needs a pool of {ops.config.evo_pool} "
                             f"C4-validation windows of {seqlen} tokens; there are {pool}")
        first = (16 * w[0] + 4 * w[1] + 3 * w[2]) / config.search_windows + 1  # one generation and the final score
        if first > budget:
            raise UsageError(f"--search_budget {config.search_budget} is less than one EvoPress generation "
                             f"({first:g} evaluations)")
    elif s.generations < 1:
        raise UsageError(f"--search_budget {config.search_budget} is less than one GA generation (16 evaluations)")
    try:
        uniform = fitness([lam] * L)
        if hasattr(ops, "search"):
            state = ops.search(lambda vs, w: [fitness(v, w) for v in vs], L, s, config.search_windows)
        else:
            from ..selfpruner.evolution import evolve

            state = evolve(fitness, L, s, ops)
    finally:
        db.restore()
    best = state["population"][0]
    if not math.isfinite(best["fitness"]):
        raise UsageError(f"--allocation search: every candidate's C4 perplexity is infinite at sparsity {target}")
    rates = check_rates([r + target - lam for r in best["rates"]], L, target)  # exactly the rates scored
    info = {"search_loop": config.search_loop, "search_budget": config.search_budget, "search_lambda": lam,
            "evals": state["evals"], "generations": state["generation"],
            "fitness": {"dataset": "c4", "windows": config.search_windows, "seqlen": seqlen},
            "uniform_fitness": uniform, "best_fitness": best["fitness"],
            "masks": "wanda" if prune_method == "sparsegpt" else prune_method,
            "history": [{k: h[k] for k in ("generation", "best", "evals")} for h in state["history"]],
            "database_seconds": t_db, "search_seconds": time.perf_counter() - t0 - t_db}
    log.info("searched rates (%s, %g evaluations): C4 ppl %.3f (uniform %.3f)", config.search_loop, state["evals"],
             best["fitness"], uniform)
    return rates, info
