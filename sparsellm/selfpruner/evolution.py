"""Self-Pruner's evolutionary search over layer-wise structured pruning rates (Huang et al., 2025;
algorithms.md §9.2), with explicit constraints, a fitness cache, elitist survival and exact resume.

    P = init(N)                                         repaired, evaluated
    for g in 1..G:
        pairs    = select(P, n)                          n = max(#crossover, #mutation) parent pairs
        children = crossover(pairs[:#crossover]) + mutate(first parents of pairs[:#mutation])
        repair and evaluate the children (fitness cached by the rounded rate vector)
        P = best N of P ∪ children                       (elitist; duplicates dropped)
        write the state (JSON) so that `resume` continues exactly here

The operators come from a registered search backend (`backends.py`: `ga.GAOperators`, or
`llm.LLMOperators` with its GA fallback). Fitness is a perplexity (lower is better) on held-out text.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import setting
from ..errors import UsageError

log = logging.getLogger("sparsellm")


@dataclass
class SearchConfig:
    """The evolution's settings: target_rate, the mean structured rate; max_rate, the per-block upper
    bound (lower bound 0); population N; generations G; crossover / mutation: children per generation
    from each operator; seed of the search's RNG. decimals (no flag): rate vectors equal after rounding
    to this many decimals share one fitness evaluation."""

    target_rate: float = setting(0.3, "mean structured rate over the blocks, in [0, 1)")
    max_rate: float = setting(0.8, "largest rate of one block")
    population: int = setting(30, "population size N")
    generations: int = setting(20, "generations G (0: the initial population only)")
    crossover: int = setting(10, "children from crossover per generation")
    mutation: int = setting(10, "children from mutation per generation")
    seed: int = setting(0, "seed of the calibration windows and of the search")
    decimals: int = 3

    def validate(self) -> "SearchConfig":
        if not 0 <= self.target_rate < 1:
            raise UsageError(f"--target_rate must be in [0, 1), got {self.target_rate}")
        if not self.target_rate <= self.max_rate < 1:
            raise UsageError(f"--max_rate must be in [target_rate = {self.target_rate}, 1), got {self.max_rate}")
        if self.population < 2:
            raise UsageError(f"--population must be >= 2, got {self.population}")
        if self.generations < 0 or self.crossover < 0 or self.mutation < 0:
            raise UsageError("--generations, --crossover and --mutation must be >= 0")
        if self.generations and not (self.crossover or self.mutation):
            raise UsageError("a generation needs children: --crossover or --mutation must be >= 1")
        if not 1 <= self.decimals <= 12:
            raise UsageError(f"--decimals must be in [1, 12], got {self.decimals}")
        return self


def repair(rates, target: float, max_rate: float) -> list[float]:
    """Make a rate vector feasible: every rate in [0, max_rate] and the mean exactly `target`.

    Non-finite entries become `target`. Then clip-then-shift is iterated to its fixed point: the common
    shift δ with mean(clip(v + δ, 0, max_rate)) = target, found by bisection (the mean is monotone in δ)."""
    def num(x):
        try:
            x = float(x)
        except (TypeError, ValueError, OverflowError):
            return target
        return x if math.isfinite(x) else target

    v = [num(x) for x in rates]
    if not v:
        raise ValueError("empty rate vector")

    def clipped(d):
        return [min(max(x + d, 0.0), max_rate) for x in v]

    lo, hi = -1.0 - max(v), 1.0 + max_rate - min(v)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(clipped(mid)) / len(v) < target:
            lo = mid
        else:
            hi = mid
    x = clipped((lo + hi) / 2)
    free = [i for i, r in enumerate(x) if 0 < r < max_rate]  # absorb the last rounding residue
    resid = target * len(x) - sum(x)
    if free and abs(resid) > 0:
        for i in free:
            x[i] = min(max(x[i] + resid / len(free), 0.0), max_rate)
    return x


def feasible(rates, target: float, max_rate: float, tol: float = 1e-9) -> bool:
    return all(-tol <= r <= max_rate + tol for r in rates) and abs(sum(rates) / len(rates) - target) <= tol


def key_of(rates, decimals: int) -> str:
    return ",".join(f"{r:.{decimals}f}" for r in rates)


@dataclass
class Context:
    """What operators may look at: the number of blocks, the constraint, the generation and a seeded RNG."""

    n_blocks: int
    target: float
    max_rate: float
    generation: int
    rng: random.Random
    seed: int


def _rng_state(rng: random.Random):
    v, state, gauss = rng.getstate()
    return [v, list(state), gauss]


def _set_rng(rng: random.Random, s) -> None:
    rng.setstate((s[0], tuple(s[1]), s[2]))


def write_state(path: Path, state: dict) -> None:
    from ..outputs import write_json_atomic

    write_json_atomic(path, state)


def evolve(fitness, n_blocks: int, config: SearchConfig, ops, state_path=None, resume: bool = False,
           settings: dict | None = None, fitness_many=None) -> dict:
    """Evolve rate vectors of length `n_blocks`; `fitness(rates) -> float` (lower is better). `ops` has
    init(n, ctx), select(pop, n, ctx), crossover(pairs, ctx), mutate(parents, ctx) returning rate vectors
    (select returns index pairs into pop), plus a `stats()` dict (fallback counts). With `state_path`,
    the state is written after every generation; `resume` continues from it (same `settings` required).
    Returns the final state: population (sorted by fitness), history, cache, evals, seconds and proposed (every
    candidate the operators proposed, after repair; evals counts those distinct and not scored before, so an
    operator that only repeats known vectors, e.g. a small LLM answering the uniform vector, shows as evals ≪
    proposed).

    fitness_many(list of rate vectors) -> list of floats, in the same order: how one generation's new
    candidates are scored (e.g. in parallel, `parallel.py`); default: `fitness` on each in turn. Each
    generation's children are repaired first, and only the distinct vectors not in the cache are scored, so
    the state is the same whichever scores them."""
    config.validate()
    rng = random.Random(config.seed)
    settings = {"search": asdict(config), "n_blocks": n_blocks, **(settings or {})}
    state_path = Path(state_path) if state_path is not None else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise UsageError(f"--resume: no search state at {state_path}")
        try:
            state = json.loads(state_path.read_text())
            if not isinstance(state, dict) or not state.get("population"):
                raise ValueError("no population")
        except ValueError as e:
            raise UsageError(f"--resume: the search state at {state_path} is unreadable ({e})") from None
        if state.get("settings") != settings:
            def flat(d, pre=""):
                out = {}
                for k, v in (d or {}).items():
                    out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
                return out

            old, new = flat(state.get("settings")), flat(json.loads(json.dumps(settings)))
            diff = sorted(k.removeprefix("search.") for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UsageError(f"--resume: the search at {state_path} was made with other settings ({', '.join(diff)})")
        _set_rng(rng, state["rng"])
        if hasattr(ops, "load_stats"):
            ops.load_stats(state.get("operators", {}))
        log.info("resumed the search after generation %d of %d", state["generation"], config.generations)
    else:
        state = {"settings": settings, "generation": -1, "population": [], "history": [], "cache": {}, "evals": 0,
                 "seconds": 0.0, "proposed": 0}
    cache = state["cache"]

    score_many = fitness_many or (lambda vs: [fitness(v) for v in vs])

    def evaluate(vectors, origins):
        """Repair `vectors`, score the distinct ones not yet in the cache (one call), return the individuals."""
        inds = []
        for v, origin in zip(vectors, origins):
            rates = repair(v, config.target_rate, config.max_rate)
            inds.append({"rates": rates, "origin": origin, "key": key_of(rates, config.decimals)})
        todo = list({i["key"]: i["rates"] for i in inds if i["key"] not in cache}.items())
        if "proposed" in state:  # candidates the operators proposed, repaired (absent in states saved before it)
            state["proposed"] += len(inds)
        if todo:
            scores = score_many([r for _, r in todo])
            if len(scores) != len(todo):
                raise RuntimeError(f"fitness_many returned {len(scores)} scores for {len(todo)} candidates")
            for (k, _), f in zip(todo, scores):
                cache[k] = float(f)
            state["evals"] += len(todo)
        for i in inds:
            i["fitness"] = cache[i["key"]]
        return inds

    def survive(pop):
        seen, out = set(), []
        for ind in sorted(pop, key=lambda p: (p["fitness"] if math.isfinite(p["fitness"]) else math.inf, p["key"])):
            if ind["key"] not in seen:
                seen.add(ind["key"])
                out.append(ind)
        return out[:config.population]

    def checkpoint(g, t0, n_children):
        pop = state["population"]
        fits = [p["fitness"] for p in pop]
        state["seconds"] += time.perf_counter() - t0
        state["history"].append({"generation": g, "best": fits[0], "mean": sum(fits) / len(fits),
                                 "evals": state["evals"], "children": n_children, "seconds": state["seconds"]})
        state["generation"] = g
        state["rng"] = _rng_state(rng)
        state["operators"] = ops.stats()
        if state_path is not None:
            write_state(state_path, state)
        log.info("generation %d: best fitness %.4f, mean %.4f, %d evaluations, %.0f s", g, fits[0],
                 state["history"][-1]["mean"], state["evals"], state["seconds"])

    if state["generation"] < 0:
        t0 = time.perf_counter()
        ctx = Context(n_blocks, config.target_rate, config.max_rate, 0, rng, config.seed)
        init = ops.init(config.population, ctx)
        state["population"] = survive(evaluate(init, ["init"] * len(init)))
        checkpoint(0, t0, len(init))
    for g in range(state["generation"] + 1, config.generations + 1):
        t0 = time.perf_counter()
        ctx = Context(n_blocks, config.target_rate, config.max_rate, g, rng, config.seed)
        pop = state["population"]
        pairs = ops.select(pop, max(config.crossover, config.mutation), ctx)
        crossed = ops.crossover([(pop[i], pop[j]) for i, j in pairs[:config.crossover]], ctx) if config.crossover else []
        mutated = ops.mutate([pop[i] for i, _ in pairs[:config.mutation]], ctx) if config.mutation else []
        children = evaluate(crossed + mutated, ["crossover"] * len(crossed) + ["mutation"] * len(mutated))
        state["population"] = survive(pop + children)
        checkpoint(g, t0, len(children))
    return state
