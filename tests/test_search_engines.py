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
