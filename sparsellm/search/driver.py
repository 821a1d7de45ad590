"""One Self-Pruner run: importance once, the evolutionary search with a held-out fitness, the best k
re-scored on WikiText-2, and the model shrunk at the best rates. Config in, report out; `sparsellm search`
calls it."""

from __future__ import annotations

import copy
import logging
import time

from ..evaluate.perplexity import eval_tokens, perplexity
from ..models import get_blocks
from ..structured import count_params, geometry, importance, prune_structured, struct_spec
from .evolution import SearchConfig, repair, run_search

log = logging.getLogger("sparsellm")


def describe(model, name: str) -> str:
    """The model paragraph of the LLM prompts."""
    spec = struct_spec(model)
    b = get_blocks(model)[0]
    n_q, n_kv, hd = geometry(model, b)
    return (f"The model is {name} ({model.config.model_type} architecture, {count_params(model) / 1e6:.3g}M "
            f"parameters): {len(get_blocks(model))} decoder layers, each with {n_q} query heads sharing {n_kv} "
            f"key/value heads (head size {hd}) and an MLP of {b.get_submodule(spec.down).in_features} channels. "
            f"A layer's rate removes that fraction of its query heads and of its MLP channels.")


def self_prune(model, tok, config: SearchConfig, ops, calib_ids, metric: str = "wanda-sp", gqa: str = "query",
               fitness_windows: int = 4, fitness_seqlen: int = 512, state_path=None, resume: bool = False,
               final_k: int = 3, final_eval=None, settings: dict | None = None, progress: bool = True):
    """Search rates for `model` (left dense) and return (pruned copy at the best rates, report).

    ops: a backend's operators, or None for the uniform vector (no search). Fitness: perplexity on the
    first `fitness_windows` C4-validation windows of `fitness_seqlen` tokens, held out from the C4
    calibration sample and from the WikiText-2 test. final_eval(model) -> dict scores the best `final_k`
    candidates at the end (the returned model is the best by fitness, never chosen on the test)."""
    t0 = time.perf_counter()
    imp = importance(model, calib_ids, metric, progress=progress)
    imp_seconds = time.perf_counter() - t0
    L = len(get_blocks(model))
    c4 = eval_tokens(tok, "c4", fitness_seqlen)
    state_settings = {"metric": metric, "gqa": gqa, "fitness": ["c4", fitness_windows, fitness_seqlen],
                      **(settings or {})}

    def shrunk(rates):
        m = copy.deepcopy(model)
        rep = prune_structured(m, rates, imp, gqa=gqa)
        return m, rep

    def fitness(rates):
        m, _ = shrunk(rates)
        return perplexity(m, tok, "c4", fitness_seqlen, fitness_windows, progress=False, ids=c4)["ppl"]

    t1 = time.perf_counter()
    if ops is None:
        rates = repair([config.target_rate] * L, config.target_rate, config.max_rate)
        state = {"population": [{"rates": rates, "fitness": fitness(rates), "origin": "uniform"}], "history": [],
                 "evals": 1, "generation": 0}
    else:
        state = run_search(fitness, L, config, ops, state_path, resume, state_settings)
    search_seconds = time.perf_counter() - t1
    finals = []
    for ind in state["population"][:max(1, final_k)]:
        entry = {"rates": ind["rates"], "fitness": ind["fitness"], "origin": ind.get("origin")}
        if final_eval is not None:
            m, _ = shrunk(ind["rates"])
            entry["eval"] = final_eval(m)
            del m
        finals.append(entry)
    best = state["population"][0]
    pruned, rep = shrunk(best["rates"])
    report = {
        "backend": getattr(ops, "name", "uniform") if ops is not None else "uniform",
        "target_rate": config.target_rate, "max_rate": config.max_rate, "metric": metric, "gqa": gqa,
        "best_rates": best["rates"], "best_fitness": best["fitness"],
        "fitness": {"dataset": "c4", "windows": fitness_windows, "seqlen": fitness_seqlen},
        "history": state["history"], "evals": state["evals"], "generations": state["generation"],
        "operators": ops.stats() if ops is not None else {}, "final": finals,
        "importance_seconds": imp_seconds, "search_seconds": search_seconds, "structure": rep,
        "params_dense": rep["params_before"], "params_pruned": rep["params_after"],
        "search": {k: v for k, v in vars(config).items()},
    }
    return pruned, report
