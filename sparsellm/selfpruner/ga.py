"""Classical genetic operators at the same evaluation budget as the LLM-driven search: the ablation the
Self-Pruner paper lacks (a reviewer asked for it; algorithms.md §9.2), and the LLM backend's fallback.

    init       the uniform vector (every block at the target) plus N − 1 random vectors target + N(0, σ_init)
    select     tournament of size k for each parent
    crossover  uniform (each block's rate from either parent) or blend (BLX-α)
    mutate     Gaussian noise N(0, σ) on every block's rate

Every vector is repaired to the constraint by the search loop afterwards.
"""

from __future__ import annotations


class GAOperators:
    name = "ga"

    def __init__(self, sigma_init: float = 0.1, sigma: float = 0.05, tournament: int = 3, crossover: str = "uniform",
                 blend_alpha: float = 0.5):
        if crossover not in ("uniform", "blend"):
            raise ValueError(f"crossover must be uniform or blend, got {crossover!r}")
        self.sigma_init, self.sigma, self.k, self.kind, self.alpha = sigma_init, sigma, tournament, crossover, blend_alpha

    def init(self, n, ctx):
        vecs = [[ctx.target] * ctx.n_blocks]
        while len(vecs) < n:
            vecs.append([ctx.target + ctx.rng.gauss(0, self.sigma_init) for _ in range(ctx.n_blocks)])
        return vecs

    def _tournament(self, pop, rng):
        picks = [rng.randrange(len(pop)) for _ in range(min(self.k, len(pop)))]
        return min(picks, key=lambda i: pop[i]["fitness"])

    def select(self, pop, n, ctx):
        pairs = []
        for _ in range(n):
            a = self._tournament(pop, ctx.rng)
            b = self._tournament(pop, ctx.rng)
            if b == a and len(pop) > 1:
                b = (a + 1 + ctx.rng.randrange(len(pop) - 1)) % len(pop)
            pairs.append((a, b))
        return pairs

    def crossover(self, pairs, ctx):
        out = []
        for p, q in pairs:
            x, y = p["rates"], q["rates"]
            if self.kind == "uniform":
                out.append([a if ctx.rng.random() < 0.5 else b for a, b in zip(x, y)])
            else:
                child = []
                for a, b in zip(x, y):
                    lo, hi = min(a, b), max(a, b)
                    d = (hi - lo) * self.alpha
                    child.append(ctx.rng.uniform(lo - d, hi + d))
                out.append(child)
        return out

    def mutate(self, parents, ctx):
        return [[r + ctx.rng.gauss(0, self.sigma) for r in p["rates"]] for p in parents]

    def stats(self) -> dict:
        return {}
