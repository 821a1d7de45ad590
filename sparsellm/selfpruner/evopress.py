"""EvoPress-style search of layer-wise rates (Sieberling et al., "EvoPress: Accurate Dynamic Model
Compression via Evolutionary Search", ICML 2025, Algorithm 1; reference code IST-DASLab/EvoPress
`evo_prune_search.py`; allocators-engines-kernels.md §7): a (1+λ) evolutionary algorithm with level-switch
mutation and multi-step selection, the stronger classical baseline beside the GA (`ga.py`).

    levels ℓ_i ∈ [lo_i, hi_i] (integers), rate_i = S + ℓ_i · Δ          parent: ℓ = 0 (the uniform vector)
    each generation:
        λ distinct offspring of the parent, each with min(U{1..3}, U{1..3}) level switches:
            one block (among those that can go down) goes down a level, one (among those that can go up)
            goes up a level                                             Σℓ stays 0: the mean stays exactly S
        for each stage (windows w_s, survivors k_s):                   (default 1, 2, 4 windows; 4, 2, 1 survivors)
            before the last stage, the parent joins the candidates (elitism)
            score every candidate on w_s fresh random windows of the pool; keep the best k_s
        the last stage's one survivor is the new parent

Differences from the reference, all deliberate: the genome is one rate per decoder block (the search space of
`evolve`), not one level per linear (the blocks of one model have equal parameter counts, so an equal Δ in
rate is EvoPress's equal Δ in weights); the fitness is perplexity on held-out C4-validation windows (the pool:
the first `evo_pool` windows), as the other backends', not KL to the dense model; the run stops when the next
generation would exceed the same budget of fitness evaluations as the GA (`budget`), counting a stage on w
windows as w / fitness_windows evaluations (a candidate found in the cache still counts: the reference has no
cache, and so the number of generations is fixed by the budget). Δ defaults to the reference's 0.5·min(S, 1 − S) / levels.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import positive_ints, setting
from ..errors import UsageError
from ..registry import register
from .evolution import SearchConfig, _rng_state, _set_rng, key_of, write_state

log = logging.getLogger("sparsellm")


@dataclass
class EvoPressConfig:
    """EvoPress's knobs: λ offspring per generation, the multi-step selection's survivors and windows per
    stage (comma lists of equal length, survivors ending in 1), the number of levels each side of the target,
    Δ (the rate of one level; None: 0.5·min(S, 1 − S) / levels), and the pool of C4-validation windows the
    stages draw from."""

    evo_offspring: int = setting(16, "evopress: offspring λ per generation")
    evo_survivors: str = setting("4,2,1", "evopress: survivors of each selection stage (ends in 1)")
    evo_windows: str = setting("1,2,4", "evopress: fitness windows per selection stage (growing)")
    evo_levels: int = setting(8, "evopress: levels each side of the target rate")
    evo_step: float | None = setting(None, "evopress: rate of one level Δ (default 0.5·min(S, 1 − S) / levels)")
    evo_pool: int = setting(64, "evopress: C4-validation windows the stages draw from")

    def stages(self) -> list[tuple[int, int]]:
        """[(survivors, windows)] per stage. Raises UsageError for bad lists."""
        surv = positive_ints(self.evo_survivors, "--evo_survivors")
        wins = positive_ints(self.evo_windows, "--evo_windows")
        if len(surv) != len(wins):
            raise UsageError(f"--evo_survivors and --evo_windows need one entry per stage ({len(surv)} vs {len(wins)})")
        if surv[-1] != 1 or any(b > a for a, b in zip(surv, surv[1:])):
            raise UsageError(f"--evo_survivors must not grow and must end in 1, got {self.evo_survivors!r}")
        if surv[0] > self.evo_offspring:
            raise UsageError(f"--evo_survivors' first stage keeps {surv[0]} of only {self.evo_offspring} offspring")
        if max(wins) > self.evo_pool:
            raise UsageError(f"--evo_windows asks for {max(wins)} windows of a pool of {self.evo_pool} (--evo_pool)")
        return list(zip(surv, wins))

    def validate(self) -> "EvoPressConfig":
        if self.evo_offspring < 1 or self.evo_levels < 1 or self.evo_pool < 1:
            raise UsageError("--evo_offspring, --evo_levels and --evo_pool must be >= 1")
        if self.evo_step is not None and not (0 < self.evo_step < 1 and math.isfinite(self.evo_step)):
            raise UsageError(f"--evo_step must be in (0, 1), got {self.evo_step}")
        self.stages()
        return self


def level_bounds(target: float, max_rate: float, step: float, levels: int) -> tuple[int, int]:
    """The lowest and highest level of a block: rate S + ℓΔ stays in [0, max_rate], |ℓ| <= levels (the
    reference's `min(floor(S·N/Δ), num_levels)` in rate units)."""
    eps = 1e-9
    return -min(levels, math.floor(target / step + eps)), min(levels, math.floor((max_rate - target) / step + eps))


def level_switch(levels: list[int], lo: int, hi: int, rng: random.Random) -> list[int]:
    """One level-switch mutation (EvoPress Algorithm 1): a uniformly chosen block that can go down a level goes
    down, then a uniformly chosen block that can go up goes up (possibly the same one: no change). Σℓ is kept."""
    out = list(levels)
    down = [i for i, v in enumerate(out) if v - 1 >= lo]
    if not down:
        return out
    out[rng.choice(down)] -= 1
    up = [i for i, v in enumerate(out) if v + 1 <= hi]
    out[rng.choice(up)] += 1
    return out


class EvoPress:
    """The `evopress` search backend: `search` replaces `evolution.evolve` for it (same state file role, same
    exact resume, same report fields)."""

    name = "evopress"

    def __init__(self, config: EvoPressConfig | None = None):
        self.config = (config or EvoPressConfig()).validate()
        self.counts = {"generations": 0, "candidates": 0, "windows": 0}  # windows: actually scored (not cached)

    def stats(self) -> dict:
        return dict(self.counts)

    def rates(self, levels, target: float, step: float) -> list[float]:
        return [target + v * step for v in levels]

    def search(self, fitness_many, n_blocks: int, config: SearchConfig, fitness_windows: int, state_path=None,
               resume: bool = False, settings: dict | None = None) -> dict:
        """Run the (1+λ) search. fitness_many(list of rate vectors, window indices into the pool) -> list of
        perplexities (lower is better), in order. The budget is GA's for `config`: population + generations ×
        (crossover + mutation) fitness evaluations of `fitness_windows` windows; a stage's candidate on w
        windows costs w / fitness_windows. The final parent is scored on windows 0..fitness_windows−1 (the
        other backends' fitness). Returns the state: population ([the final parent]), history, evals (in
        evaluations, a float), generation, seconds. Raises UsageError on resume with other settings."""
        config.validate()
        c = self.config
        stages = c.stages()
        if c.evo_pool < fitness_windows:
            raise UsageError(f"--evo_pool ({c.evo_pool}) must hold the {fitness_windows} fitness windows")
        S, M = config.target_rate, config.max_rate
        step = c.evo_step or 0.5 * min(S, 1 - S) / c.evo_levels
        lo, hi = level_bounds(S, M, step, c.evo_levels) if S > 0 else (0, 0)
        budget = config.population + config.generations * (config.crossover + config.mutation)
        settings = {"search": asdict(config), "evopress": asdict(c), "n_blocks": n_blocks, **(settings or {})}
        state_path = None if state_path is None else Path(state_path)
        rng = random.Random(config.seed)
        if resume:
            state = _load(state_path, settings)
            _set_rng(rng, state["rng"])
            self.counts = state["operators"]
        else:
            state = {"settings": settings, "generation": 0, "levels": [0] * n_blocks, "history": [], "evals": 0.0,
                     "seconds": 0.0, "cache": {}, "rng": _rng_state(rng), "operators": dict(self.counts)}
            if state_path is not None:  # a run killed in its first generation resumes from here
                write_state(state_path, state)
        cache = state["cache"]

        def scored(cands, windows):
            keys = [f"{key_of(self.rates(v, S, step), config.decimals)}|{','.join(map(str, windows))}" for v in cands]
            todo = list({k: v for k, v in zip(keys, cands) if k not in cache}.items())
            if todo:
                for (k, _), f in zip(todo, fitness_many([self.rates(v, S, step) for _, v in todo], list(windows))):
                    cache[k] = float(f) if math.isfinite(f) else math.inf
                self.counts["windows"] += len(todo) * len(windows)
            state["evals"] += len(cands) * len(windows) / fitness_windows  # the budget counts cache hits too
            return [cache[k] for k in keys]

        gen_cost = (c.evo_offspring * stages[0][1] + sum(k * w for (k, _), (_, w) in zip(stages, stages[1:]))
                    + stages[-1][1]) / fitness_windows  # the parent joins the last stage
        movable = n_blocks > 1 and lo < 0 < hi  # a level switch needs room both down and up
        while movable and state["evals"] + gen_cost + 1 <= budget:  # + 1: the final parent's score
            t0 = time.perf_counter()
            parent = state["levels"]
            offspring, tries = [], 0
            while len(offspring) < c.evo_offspring and tries < 100 * c.evo_offspring:
                tries += 1
                child = parent
                for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
                    child = level_switch(child, lo, hi, rng)
                if child != parent and child not in offspring:
                    offspring.append(child)
            if not offspring:  # no child differs from the parent: nothing left to search
                break
            cands = offspring
            for s, (keep, w) in enumerate(stages):
                if s == len(stages) - 1 and parent not in cands:
                    cands = cands + [parent]
                windows = sorted(rng.sample(range(c.evo_pool), w))
                fits = scored(cands, windows)
                order = sorted(range(len(cands)), key=lambda i: (fits[i], i))[:keep]
                cands, best = [cands[i] for i in order], fits[order[0]]
            state["levels"] = cands[0]
            self.counts["generations"] += 1
            self.counts["candidates"] += len(offspring)
            state["generation"] += 1
            state["seconds"] += time.perf_counter() - t0
            state["history"].append({"generation": state["generation"], "best": best, "mean": best,
                                     "evals": state["evals"], "children": len(offspring), "seconds": state["seconds"]})
            state["rng"], state["operators"] = _rng_state(rng), dict(self.counts)
            if state_path is not None:
                write_state(state_path, state)
            log.info("evopress generation %d: parent's last-stage fitness %.4f, %.1f of %d evaluations",
                     state["generation"], best, state["evals"], budget)
        rates = self.rates(state["levels"], S, step)
        final = scored([state["levels"]], list(range(fitness_windows)))[0]
        state["population"] = [{"rates": rates, "fitness": final, "origin": "evopress",
                                "key": key_of(rates, config.decimals)}]
        state["budget"], state["step"], state["level_bounds"] = budget, step, [lo, hi]
        return state


def _load(path, settings: dict) -> dict:
    if path is None or not path.is_file():
        raise UsageError(f"--resume: no search state at {path}")
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or "levels" not in state:
            raise ValueError("not an evopress state")
    except ValueError as e:
        raise UsageError(f"--resume: the search state at {path} is unreadable ({e})") from None
    if state.get("settings") != json.loads(json.dumps(settings)):
        raise UsageError(f"--resume: the search at {path} was made with other settings")
    return state


@register("search_backend", "evopress", EvoPressConfig)
def evopress(config: EvoPressConfig, *, describe: str, log_path=None):
    """EvoPress-style (1+λ) search: level-switch mutation, multi-step selection"""
    return EvoPress(config)
