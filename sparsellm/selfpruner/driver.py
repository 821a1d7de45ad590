"""One Self-Pruner search on a loaded model (Huang et al., 2025): the importance of heads and channels
once, the evolutionary search of layer-wise rates with a held-out fitness, the best k re-scored with the
final evaluation, and a copy of the model shrunk at the best rates. `Structure` and `Fitness` are its own
settings; `sparsellm.runs.search.run_search` (what `sparsellm search` calls) wraps it into a whole run."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from ..config import at_least, setting
from ..lazy import lazy_import
from ..errors import UsageError
from ..evaluate.perplexity import eval_tokens, perplexity
from ..models import context_length, get_blocks
from ..onload import ATTR
from ..structured import GQA_MODES, METRICS, count_params, geometry, importance, prune_structured, struct_spec
from .evolution import SearchConfig, evolve, repair

torch = lazy_import("torch")
log = logging.getLogger("sparsellm")


@dataclass
class Structure:
    """What a rate removes: heads and MLP channels ranked by `metric`, with GQA handled by `gqa`."""

    metric: str = setting("wanda-sp", "importance of heads and channels (flap adds its bias compensation)",
                          choices=METRICS)
    gqa: str = setting("query", "GQA: remove equal numbers of query heads per KV group, or whole KV groups",
                       choices=GQA_MODES)

    def validate(self) -> "Structure":
        if self.metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.gqa not in GQA_MODES:
            raise UsageError(f"--gqa must be one of {', '.join(GQA_MODES)}, got {self.gqa!r}")
        return self


@dataclass
class Fitness:
    """A candidate's fitness: perplexity on the first `fitness_windows` C4-validation windows of
    `fitness_seqlen` tokens (held out from the C4 calibration sample and from the WikiText-2 test); the
    best `final_k` candidates are re-scored with the final evaluation at the end."""

    fitness_windows: int = setting(4, "held-out C4-validation windows per fitness")
    fitness_seqlen: int = setting(512, "tokens per fitness window")
    final_k: int = setting(3, "best candidates re-scored with --eval at the end")

    def validate(self) -> "Fitness":
        at_least(self, ("fitness_windows",))
        at_least(self, ("fitness_seqlen",), 2)
        at_least(self, ("final_k",))
        return self


def describe(model, name: str) -> str:
    """The model paragraph of the LLM prompts."""
    spec = struct_spec(model)
    b = get_blocks(model)[0]
    n_q, n_kv, hd = geometry(model, b)
    return (f"The model is {name} ({model.config.model_type} architecture, {count_params(model) / 1e6:.3g}M "
            f"parameters): {len(get_blocks(model))} decoder layers, each with {n_q} query heads sharing {n_kv} "
            f"key/value heads (head size {hd}) and an MLP of {b.get_submodule(spec.down).in_features} channels. "
            f"A layer's rate removes that fraction of its query heads and of its MLP channels.")


def shrunk(model, imp: dict, rates, gqa: str, device=None):
    """(a copy of `model` shrunk at `rates` with importance `imp`, then moved to `device` (None: left where
    `model` is), prune_structured's report). `model` is unchanged."""
    m = copy.deepcopy(model)
    if hasattr(m, ATTR):  # the copy's onloader (if any) points at the copy; the candidate needs none
        delattr(m, ATTR)
    rep = prune_structured(m, rates, imp, gqa=gqa)
    if device is not None:
        m.to(device)
    return m, rep


def fitness_of(model, imp: dict, rates, ids, seqlen: int, windows: int, gqa: str, device=None) -> float:
    """A candidate's fitness: the perplexity (lower is better) of `model` shrunk at `rates` on the first
    `windows` windows of `seqlen` tokens of the token ids `ids` (1, T) (the C4-validation stream of
    `eval_tokens`; no tokenizer needed). The serial search and the Ray workers (`parallel.py`) both call
    this, so their fitness values are the same bit for bit on the same device type."""
    m, _ = shrunk(model, imp, rates, gqa, device)
    return perplexity(m, None, "c4", seqlen, windows, progress=False, ids=ids)["ppl"]


def self_prune(model, tok, config: SearchConfig, ops, calib_ids, structure: Structure | None = None,
               fitness: Fitness | None = None, state_path=None, resume: bool = False, final_eval=None,
               settings: dict | None = None, progress: bool = True, batch_size: int | None = None, device=None,
               cluster=None):
    """Search rates for `model` (left dense) and return (pruned copy at the best rates, report).

    ops: a backend's operators (`backends.operators`), or None for the uniform vector (no search). calib_ids: the calibration
    windows of the importance (None for magnitude-sp); batch_size: windows per block forward. With
    `state_path` the search state is written after every generation, and `resume` continues it (the same
    `settings` required). final_eval(model) -> dict scores the best `fitness.final_k` candidates at the
    end (the returned model is the best by fitness, never chosen on the test).

    Devices: the importance pass goes through the engine (blocks onloaded to an attached onloader's device,
    `sparsellm.onload`); every candidate is shrunk from a copy of `model` where `model` is, then moved to
    `device` (None: left there) for its fitness and final scores. The returned model is on `device`.

    cluster: a `parallel.Cluster`: each generation's candidates are scored on its Ray workers (the same
    `fitness_of`, the same state as the serial search); its actors are released after the search, and the
    final re-scoring runs here."""
    structure, fit = structure or Structure(), fitness or Fitness()
    metric, gqa, seqlen = structure.metric, structure.gqa, min(fit.fitness_seqlen, context_length(model))
    c4 = eval_tokens(tok, "c4", seqlen)
    pool = c4.shape[1] // seqlen
    if hasattr(ops, "search") and ops.config.evo_pool > pool:  # refused before the importance pass
        raise UsageError(f"--evo_pool {ops.config.evo_pool} is more than the {pool} C4-validation windows of "
                         f"{seqlen} tokens")
    t0 = time.perf_counter()
    imp = importance(model, calib_ids, metric, batch_size=batch_size, progress=progress)
    imp_seconds = time.perf_counter() - t0
    L = len(get_blocks(model))
    fit_ids = c4[:, :fit.fitness_windows * seqlen]  # what the fitness reads
    state_settings = {"metric": metric, "gqa": gqa, "fitness": ["c4", fit.fitness_windows, seqlen],
                      **(settings or {})}

    def score(rates, windows=None):
        """C4 perplexity of the model shrunk at `rates`: on the first fitness_windows windows, or on the given
        window indices of the C4-validation stream (EvoPress's stages)."""
        if windows is None:
            return fitness_of(model, imp, rates, fit_ids, seqlen, fit.fitness_windows, gqa, device)
        ids = torch.cat([c4[:, w * seqlen:(w + 1) * seqlen] for w in windows], 1)
        return fitness_of(model, imp, rates, ids, seqlen, len(windows), gqa, device)

    t1 = time.perf_counter()
    if ops is None:
        rates = repair([config.target_rate] * L, config.target_rate, config.max_rate)
        state = {"population": [{"rates": rates, "fitness": score(rates), "origin": "uniform"}], "history": [],
                 "evals": 1, "generation": 0}
    elif hasattr(ops, "search"):  # a backend with its own loop (EvoPress)
        state = ops.search(lambda vs, w: [score(v, w) for v in vs], L, config, fit.fitness_windows, state_path,
                           resume, state_settings)
    else:
        try:
            many = cluster.fitness(model, imp, fit_ids, seqlen, fit.fitness_windows, gqa, device) if cluster else None
            state = evolve(score, L, config, ops, state_path, resume, state_settings, fitness_many=many)
        finally:
            if cluster is not None:
                cluster.release()
    search_seconds = time.perf_counter() - t1
    finals = []
    for ind in state["population"][:max(1, fit.final_k)]:
        entry = {"rates": ind["rates"], "fitness": ind["fitness"], "origin": ind.get("origin")}
        if final_eval is not None:
            m, _ = shrunk(model, imp, ind["rates"], gqa, device)
            entry["eval"] = final_eval(m)
            del m
        finals.append(entry)
    best = state["population"][0]
    pruned, rep = shrunk(model, imp, best["rates"], gqa, device)
    report = {
        "backend": getattr(ops, "name", "uniform") if ops is not None else "uniform",
        "target_rate": config.target_rate, "max_rate": config.max_rate, "metric": metric, "gqa": gqa,
        "best_rates": best["rates"], "best_fitness": best["fitness"],
        "fitness": {"dataset": "c4", "windows": fit.fitness_windows, "seqlen": seqlen},
        "history": state["history"], "evals": state["evals"], "generations": state["generation"],
        "proposed": state.get("proposed"), "new_candidates": state["evals"] if "proposed" in state else None,
        "operators": ops.stats() if ops is not None else {}, "final": finals,
        "importance_seconds": imp_seconds, "search_seconds": search_seconds, "structure": rep,
        "params_dense": rep["params_before"], "params_pruned": rep["params_after"],
        "search": {k: v for k, v in vars(config).items()},
    }
    return pruned, report
