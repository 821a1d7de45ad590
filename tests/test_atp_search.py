"""ATP's β search (issue 21): the golden-section (Fibonacci) search on the β grid returns the exhaustive grid's β
with fewer trials, on objectives known in advance (injected) and on a tiny random model end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_model
from sparsellm.allocate import atp, atp_search
from sparsellm.allocate.atp_search import beta_grid, fibonacci_search, search


def _argmin(values):
    """The exhaustive grid's choice: lowest value, then lowest index (lowest β)."""
    return min(range(len(values)), key=lambda i: (values[i], i))


def _max_scores(n):
    fib = [1, 1, 2]
    while fib[-1] < n + 1:
        fib.append(fib[-1] + fib[-2])
    return len(fib) - 2


SHAPES = {  # unimodal in the sense of fibonacci_search's docstring: strictly down to the first minimum, then never down
    "bowl": lambda i, m: (i - m) ** 2,
    "v, steep right": lambda i, m: (m - i) if i <= m else 5.0 * (i - m),
    "flat bottom": lambda i, m: max(abs(i - m), 2) if i >= m else m - i + 2,  # m, m+1, m+2 tie at 2
    "tie right of min": lambda i, m: m - i if i <= m else min(i - m, 1),  # everything right of m ties at 1
    "diverges right": lambda i, m: m - i if i <= m else math.inf,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 11, 12, 21, 40, 200])
def test_fibonacci_search_returns_the_brute_force_argmin(shape, n):
    for m in sorted({0, 1, n // 3, n // 2, n - 2, n - 1} & set(range(n))):
        values = [float(SHAPES[shape](i, m)) for i in range(n)]
        calls = []
        best, order = fibonacci_search(lambda i: calls.append(i) or values[i], n)
        assert best == _argmin(values), (m, values)
        assert calls == order and len(set(calls)) == len(calls) and all(0 <= i < n for i in calls)
        assert len(calls) <= _max_scores(n)
        if n >= 5:
            assert len(calls) < n


@pytest.mark.parametrize("seed", range(20))
def test_fibonacci_search_on_a_bumpy_objective_is_deterministic_and_a_local_minimum(seed):
    """Not unimodal (random scores, with ties and infs): no promise of the global minimum, but the same grid
    point every time, no scored point below it (ties: none at a lower index), and both neighbours scored."""
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 60)
    values = [rng.choice([rng.randint(0, 5) * 1.0, math.inf]) for _ in range(n)]
    runs = [fibonacci_search(lambda i: values[i], n) for _ in range(2)]
    assert runs[0] == runs[1]
    best, order = runs[0]
    assert min((values[i], i) for i in order) == (values[best], best)
    assert {best - 1, best + 1} & set(range(n)) <= set(order)
    assert len(order) <= _max_scores(n)


def test_fibonacci_search_recorded_non_unimodal_table():
    """The recorded Wanda 70% search at step 0.002 (0.010 scores below 0.012, then 0.014 lowest): the grid's β."""
    table = [1272.3, 1030.2, 789.3, 645.1, 591.3, 456.5, 509.7, 439.2, 452.7, 567.4, 1442.1]
    best, order = fibonacci_search(lambda i: table[i], len(table))
    assert best == _argmin(table) == 7 and len(order) == 5


@pytest.fixture
def injected(monkeypatch):
    """The search's objective replaced by a known function of β: every trial's prune records its rates, and the
    'perplexity' that follows returns objective(β) for the β those rates come from."""
    state = {"f": None, "beta": None, "trials": 0, "betas": {}}  # betas: {rates: β}, set by the test
    prune = atp_search.prune_blocks

    def recording_prune(model, ids, method, rates, **kw):
        state["beta"] = state["betas"][tuple(rates)]
        return prune(model, ids, method, rates, **kw)

    def fake_perplexity(*args, **kwargs):
        state["trials"] += 1
        return {"ppl": state["f"](state["beta"]), "metric": "c4_ppl@16", "total_windows": 1}

    monkeypatch.setattr(atp_search, "prune_blocks", recording_prune)
    monkeypatch.setattr(atp_search, "perplexity", fake_perplexity)
    monkeypatch.setattr(atp_search, "eval_tokens", lambda *a, **k: None)
    return state


@pytest.mark.parametrize("name,f", [
    ("bowl", lambda b: (b - 0.237) ** 2 + 10.0),
    ("plateau", lambda b: max(abs(b - 0.2), 0.05) + 10.0),  # flat from 0.15 to 0.25: the lowest β of it
    ("at β = 0", lambda b: 10.0 + b),
    ("at the last β", lambda b: 10.0 - b),
])
def test_search_returns_the_grid_beta_on_a_known_objective(injected, tokenizer, name, f):
    """A tiny model (3 blocks, magnitude pruning) whose objective is known: the golden search's β is the
    brute-force argmin over the grid, with fewer trials than grid points; the model is left dense."""
    model = make_model("llama", num_hidden_layers=3, max_position_embeddings=64)
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    grid = beta_grid(3, 0.5, 0.01)  # β_max = 0.5, left out: 50 points
    expected = grid[_argmin([f(b) for b in grid])]
    injected["f"], injected["betas"] = f, {tuple(atp.allocate(3, 0.5, atp_beta=b)): b for b in grid}
    rep = search(model, tokenizer, ids, "magnitude", 0.5, step=0.01, objective_seqlen=16, progress=False)
    assert rep["strategy"] == "golden" and rep["grid_size"] == len(grid) == 50
    assert rep["best_beta"] == pytest.approx(expected, abs=1e-12)
    assert len(rep["trials"]) == injected["trials"] <= _max_scores(len(grid)) < len(grid)
    assert [t["beta"] for t in rep["trials"]] == sorted({t["beta"] for t in rep["trials"]})
    assert sorted(t["order"] for t in rep["trials"]) == list(range(len(rep["trials"])))
    assert all(t["objective"] == pytest.approx(f(t["beta"])) for t in rep["trials"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    injected["trials"] = 0
    full = search(model, tokenizer, ids, "magnitude", 0.5, step=0.01, objective_seqlen=16, progress=False,
                  strategy="grid")
    assert injected["trials"] == len(full["trials"]) == 50 and full["best_beta"] == rep["best_beta"]


def _trained_tiny_model(tokens: torch.Tensor, steps: int = 150):
    """A 4-block tiny llama fitted for `steps` Adam steps to 16 windows of 32 of `tokens` (1, T): a random
    tiny model scores near the vocabulary size whatever the β, so its objective has no shape to search."""
    model = make_model("llama", num_hidden_layers=4, max_position_embeddings=64)
    x = tokens[0, : 16 * 32].reshape(16, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_golden_and_grid_pick_the_same_beta_end_to_end(tokenizer):
    """A tiny model (built and fitted here) pruned with Wanda at 50%, scored by real perplexity: the golden
    search tries fewer βs than the grid, each with the grid's objective, and chooses the grid's β. The grid's
    objective table is checked to have one interior minimum here (otherwise the two need not agree)."""
    from sparsellm.data import eval_tokens

    tokens = eval_tokens(tokenizer, "wikitext2", 32)
    model = _trained_tiny_model(tokens)
    ids = tokens[0, 1000 : 1000 + 4 * 16].reshape(4, 16).clone()
    kw = dict(step=0.04, objective="wikitext2", objective_windows=2, objective_seqlen=32, progress=False)
    grid = search(model, tokenizer, ids, "wanda", 0.5, strategy="grid", **kw)
    golden = search(model, tokenizer, ids, "wanda", 0.5, **kw)
    table = [t["objective"] for t in grid["trials"]]
    m = _argmin(table)
    assert all(a > b for a, b in zip(table[:m], table[1:m + 1])) and all(
        a <= b for a, b in zip(table[m:], table[m + 1:])), table  # strictly down, then never down
    assert 0 < m < len(table) - 1  # an interior minimum: the search has to find it
    assert golden["best_beta"] == grid["best_beta"]
    assert len(golden["trials"]) < len(grid["trials"]) == grid["grid_size"] == golden["grid_size"]
    by_beta = {t["beta"]: t["objective"] for t in grid["trials"]}
    assert all(t["objective"] == pytest.approx(by_beta[t["beta"]], rel=1e-6) for t in golden["trials"])


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_mask_trials_score_masks_of_the_dense_statistics(method, tokenizer):
    """`kind="masks"`: every trial's objective is the perplexity, computed here from logits, of the dense model
    with the masks of its rates built here from the dense inputs (Wanda per row; magnitude per matrix), and
    the model is left dense."""
    import torch.nn.functional as F

    from sparsellm.data import eval_tokens
    from sparsellm.models import block_linears, get_blocks
    from tests.test_rate_search import _dense_input_norms

    model = make_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    lins = {(i, n): lin for i, b in enumerate(get_blocks(model)) for n, lin in block_linears(model, b).items()}
    dense = {k: lin.weight.detach().clone() for k, lin in lins.items()}
    norms = _dense_input_norms(model, ids)
    rep = search(model, tokenizer, ids, method, 0.5, step=0.1, objective_windows=2, objective_seqlen=16,
                 progress=False, strategy="grid", kind="masks")
    assert rep["one_prune_seconds"] is None and rep["trials_kind"] == "masks"
    assert len(rep["trials"]) == rep["grid_size"] == len(beta_grid(3, 0.5, 0.1)) == 5
    assert all(torch.equal(lin.weight, dense[k]) for k, lin in lins.items())
    c4 = eval_tokens(tokenizer, "c4", 16)[0, :32].reshape(2, 16)
    for t in rep["trials"]:
        for (i, n), lin in lins.items():
            w = dense[(i, n)].double()
            score = w.abs() * norms[(i, n)][None] if method == "wanda" else w.abs()
            k = int((w.shape[1] if method == "wanda" else w.numel()) * t["rates"][i])
            if method == "wanda":
                keep = score > score.sort(dim=1).values[:, k - 1:k] if k else torch.ones_like(w, dtype=torch.bool)
            else:
                keep = score > score.flatten().sort().values[k - 1] if k else torch.ones_like(w, dtype=torch.bool)
            lin.weight.data = dense[(i, n)] * keep
        with torch.no_grad():
            logits = model(c4).logits.double()
        nll = sum(F.cross_entropy(logits[j, :-1], c4[j, 1:], reduction="sum").item() for j in range(2)) / 30
        assert t["objective"] == pytest.approx(math.exp(nll), rel=1e-4), t["beta"]
    for k, lin in lins.items():
        lin.weight.data = dense[k]
