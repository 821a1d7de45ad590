"""The search loops' batch scoring: `evolve` scores each generation's new candidates in one call, and the
state is the same whichever scores them (the hook that parallel fitness uses)."""

from __future__ import annotations

from sparsellm.selfpruner import GAOperators, SearchConfig, evolve


def _f(rates):  # a smooth objective with its minimum at a rising profile
    return sum((r - (0.1 + 0.1 * i)) ** 2 for i, r in enumerate(rates))


class _Repeating(GAOperators):
    """GA operators that also propose vectors already scored and the same vector twice in one generation."""

    def init(self, n, ctx):
        vecs = super().init(n - 1, ctx)
        return vecs + [vecs[0]]

    def mutate(self, parents, ctx):
        out = super().mutate(parents, ctx)
        return [p["rates"] if i % 2 else v for i, (v, p) in enumerate(zip(out, parents))] + out[:1]


def test_fitness_many_same_state_and_only_new_distinct_vectors():
    cfg = SearchConfig(target_rate=0.3, max_rate=0.7, population=6, generations=4, crossover=4, mutation=4, seed=3)
    serial = evolve(_f, 5, cfg, _Repeating())
    calls = []

    def many(vectors):
        calls.append(vectors)
        keys = [",".join(f"{r:.3f}" for r in v) for v in vectors]
        assert len(set(keys)) == len(keys), "a batch holds each distinct vector once"
        return [_f(v) for v in reversed(vectors)][::-1]  # scored in another order, returned in order

    batched = evolve(_f, 5, cfg, _Repeating(), fitness_many=many)
    assert len(calls) == 1 + cfg.generations  # one call per generation (and the initial population)
    seen = [",".join(f"{r:.3f}" for r in v) for batch in calls for v in batch]
    assert len(seen) == len(set(seen)) == batched["evals"]  # nothing scored twice
    for key in ("population", "history", "evals", "cache"):
        if key == "history":
            assert [{k: h[k] for k in ("best", "mean", "evals")} for h in batched[key]] == \
                   [{k: h[k] for k in ("best", "mean", "evals")} for h in serial[key]]
        else:
            assert batched[key] == serial[key]


# ------------------------------------------------------------------------------------ EvoPress-style search

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from sparsellm.errors import UsageError  # noqa: E402
from sparsellm.selfpruner.evopress import EvoPress, EvoPressConfig, level_bounds, level_switch  # noqa: E402


@pytest.mark.parametrize("seed", range(5))
def test_level_switch_keeps_the_sum_and_the_bounds(seed):
    rng = random.Random(seed)
    lo, hi = -3, 2
    levels = [0] * 7
    for _ in range(300):
        new = level_switch(levels, lo, hi, rng)
        assert sum(new) == 0 and all(lo <= v <= hi for v in new)
        moved = [i for i, (a, b) in enumerate(zip(levels, new)) if a != b]
        assert moved == [] or (len(moved) == 2 and sorted(new[i] - levels[i] for i in moved) == [-1, 1])
        levels = new
    assert min(levels) < 0 < max(levels)  # it does move


def test_level_bounds_by_hand():
    # S = 0.3, Δ = 0.05, max 0.45: down to 0.0 is 6 levels (capped at 4), up to 0.45 is 3
    assert level_bounds(0.3, 0.45, 0.05, 4) == (-4, 3)
    assert level_bounds(0.3, 0.45, 0.05, 8) == (-6, 3)
    assert level_bounds(0.1, 0.8, 0.04, 8) == (-2, 8)


def _rising(v):  # window-independent objective, lowest at a rising profile with mean 0.3
    return sum((r - (0.1 + 0.1 * i)) ** 2 for i, r in enumerate(v))


def _evopress(**kw):
    cfg = SearchConfig(target_rate=0.3, max_rate=0.6, population=4, generations=6, crossover=4, mutation=4, seed=1)
    ops = EvoPress(EvoPressConfig(**{"evo_offspring": 6, "evo_survivors": "3,2,1", "evo_windows": "1,2,4",
                                     "evo_pool": 8, **kw}))
    return cfg, ops


def test_evopress_parent_is_the_best_of_offspring_and_parent_each_generation():
    """With a window-independent fitness, multi-step selection keeps the best of the offspring and the parent:
    each generation's parent scores no worse than the old parent and than every offspring scored in stage 1
    (offspring found in the cache are not passed again), and the budget fixes the number of generations."""
    cfg, ops = _evopress(evo_step=0.05)
    calls = []

    def many(vectors, windows):
        calls.append((vectors, windows))
        return [_rising(v) for v in vectors]

    state = ops.search(many, 4, cfg, 4)
    budget = cfg.population + cfg.generations * (cfg.crossover + cfg.mutation)  # 52 evaluations of 4 windows
    per_gen = (6 * 1 + 3 * 2 + (2 + 1) * 4) / 4  # stage 1: 6 × 1 window, 2: 3 × 2, 3: (2 + parent) × 4
    assert state["generation"] == int((budget - 1) // per_gen) == 8
    assert state["evals"] == pytest.approx(state["generation"] * per_gen + 1) and state["evals"] <= budget
    parent, history = [0.3] * 4, state["history"]
    stage1 = [c for c in calls if len(c[1]) == 1]
    assert len(stage1) <= len(history) and all(abs(sum(v) / 4 - 0.3) < 1e-12 for c in calls for v in c[0])
    seen = {tuple(round(r, 9) for r in parent)}
    best = _rising(parent)
    for h in history:
        assert h["best"] <= best + 1e-15  # never worse than the old parent (elitism at the last stage)
        best = h["best"]
    for vectors, _ in stage1:
        assert all(best <= _rising(v) + 1e-15 for v in vectors)
        seen.update(tuple(round(r, 9) for r in v) for v in vectors)
    final = state["population"][0]
    assert calls[-1][1] == [0, 1, 2, 3] and final["fitness"] == pytest.approx(best)
    assert final["fitness"] == pytest.approx(_rising(final["rates"])) and best < _rising([0.3] * 4)
    assert abs(sum(final["rates"]) / 4 - 0.3) < 1e-12 and all(0 <= r <= 0.6 for r in final["rates"])


def test_evopress_resume_continues_exactly(tmp_path):
    def many(vectors, windows):  # a window-dependent fitness: the windows drawn matter
        return [_rising(v) + 0.01 * sum(windows) * v[0] for v in vectors]

    cfg, ops = _evopress()
    full = ops.search(many, 5, cfg, 4, tmp_path / "a.json")
    n = [0]

    def dying(vectors, windows):
        n[0] += 1
        if n[0] == 8:  # in the third generation
            raise KeyboardInterrupt
        return many(vectors, windows)

    cfg2, ops2 = _evopress()
    with pytest.raises(KeyboardInterrupt):
        ops2.search(dying, 5, cfg2, 4, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["generation"] == 2
    cfg3, ops3 = _evopress()
    resumed = ops3.search(many, 5, cfg3, 4, tmp_path / "b.json", resume=True)
    for key in ("population", "evals", "generation", "levels", "cache"):
        assert resumed[key] == full[key], key
    assert [h["best"] for h in resumed["history"]] == [h["best"] for h in full["history"]]
    cfg4, ops4 = _evopress(evo_offspring=5)
    with pytest.raises(UsageError, match="other settings"):
        ops4.search(many, 5, cfg4, 4, tmp_path / "b.json", resume=True)


@pytest.mark.parametrize("kw,match", [
    ({"evo_survivors": "3,2"}, "one entry per stage"), ({"evo_survivors": "2,3,1"}, "must not grow"),
    ({"evo_survivors": "3,2,2"}, "end in 1"), ({"evo_windows": "1,x,4"}, "comma-separated"),
    ({"evo_windows": "1,2,9"}, "pool"), ({"evo_offspring": 2}, "only 2 offspring"), ({"evo_step": 0}, "evo_step"),
    ({"evo_levels": 0}, ">= 1"),
])
def test_evopress_config_bad_input(kw, match):
    with pytest.raises(UsageError, match=match):
        EvoPressConfig(**{"evo_survivors": "3,2,1", "evo_windows": "1,2,4", "evo_pool": 8, **kw}).validate()


def test_evopress_one_block_or_zero_target_is_the_uniform_vector():
    cfg, ops = _evopress()
    calls = []
    state = ops.search(lambda vs, w: calls.append(w) or [1.0] * len(vs), 1, cfg, 4)
    assert state["population"][0]["rates"] == [0.3] and calls == [[0, 1, 2, 3]]


def test_cli_evopress_end_to_end(tmp_path, saved_model_dir, tokenizer):
    """`sparsellm search --backend evopress` on a tiny model: mean exact, the budget kept, and the reported
    fitness equals the C4 perplexity of the saved model, computed here from its logits."""
    import math

    import torch
    import torch.nn.functional as F

    from sparsellm.data import eval_tokens
    from sparsellm.models import load_model
    from tests.test_selfpruner import _search

    out = tmp_path / "e"
    assert _search(saved_model_dir, out, "--backend", "evopress", "--evo_offspring", "4", "--evo_survivors", "2,1",
                   "--evo_windows", "1,2", "--evo_pool", "16") == 0
    rep = json.loads((out / "report.json").read_text())["search"]
    assert rep["backend"] == "evopress" and rep["generations"] == 2  # budget 4 + 2·(2 + 2) = 12, 5 per generation
    assert rep["evals"] == pytest.approx(2 * 5 + 1)
    assert abs(sum(rep["best_rates"]) / 2 - 0.3) < 1e-9 and rep["operators"]["generations"] == 2
    model, _, _ = load_model(str(out))
    ids = eval_tokens(tokenizer, "c4", 32)[0, :64].reshape(2, 32)
    with torch.no_grad():
        logits = model(ids).logits.double()
    nll = sum(F.cross_entropy(logits[i, :-1], ids[i, 1:], reduction="sum").item() for i in range(2)) / (2 * 31)
    assert rep["best_fitness"] == pytest.approx(math.exp(nll), rel=1e-4)
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["evo_survivors"] == "2,1" and "llm_temperature" not in config


def test_cli_evopress_bad_input(tmp_path, saved_model_dir, capsys):
    from tests.test_selfpruner import _search

    assert _search(saved_model_dir, tmp_path / "e", "--backend", "evopress", "--evo_pool", "999",
                   "--evo_windows", "1,2", "--evo_survivors", "2,1") == 2
    assert "--evo_pool 999 is more than" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert _search(saved_model_dir, tmp_path / "g", "--backend", "ga", "--evo_levels", "3") == 2
    assert "--evo_levels applies only to --backend evopress" in capsys.readouterr().err


@pytest.mark.parametrize("max_rate,step", [(0.3, None), (0.6, 0.4)])
def test_evopress_without_room_to_move_returns_the_uniform_vector(max_rate, step):
    """Breaker finding: max_rate == target (no level up) or Δ > target (no level down) crashed on an empty
    offspring list; it is the uniform vector."""
    cfg = SearchConfig(target_rate=0.3, max_rate=max_rate, population=4, generations=6, crossover=4, mutation=4, seed=1)
    ops = EvoPress(EvoPressConfig(evo_offspring=6, evo_survivors="3,2,1", evo_windows="1,2,4", evo_pool=8,
                                  evo_step=step))
    state = ops.search(lambda vs, w: [_rising(v) for v in vs], 4, cfg, 4)
    assert state["population"][0]["rates"] == pytest.approx([0.3] * 4) and state["generation"] == 0
