"""Searched per-block sparsities (`--allocation search`, allocate/search.py): the mask database against Wanda
masks computed here from the dense model's captured inputs, the search's rates (mean exact, within S ± λ),
its reported fitness against a perplexity computed here from logits, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsellm.allocate.search import MaskDatabase, RateSearchConfig
from sparsellm.errors import UsageError
from sparsellm.models import block_linears, get_blocks
from tests.conftest import make_model


def _calib(n=4, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (n, seqlen), generator=g)


def _dense_input_norms(model, ids):
    """‖X_j‖ of every block linear's input over all calibration tokens, from hooks on the dense model."""
    sq, hooks = {}, []
    for i, b in enumerate(get_blocks(model)):
        for n, lin in block_linears(model, b).items():
            def hook(m, args, key=(i, n)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + x.square().sum(0)
            hooks.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:  # one window at a time, no padding
            model(row[None])
    for h in hooks:
        h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_mask_database_equals_masks_from_the_dense_inputs(method):
    model = make_model("llama", num_hidden_layers=3)
    ids = _calib()
    dense = {(i, n): lin.weight.detach().clone() for i, b in enumerate(get_blocks(model))
             for n, lin in block_linears(model, b).items()}
    norms = _dense_input_norms(model, ids)
    db = MaskDatabase(model, ids, method, progress=False)
    rates = [0.2, 0.55, 0.8]
    db.apply(rates)
    for i, b in enumerate(get_blocks(model)):
        for n, lin in block_linears(model, b).items():
            w = dense[(i, n)].double()
            if method == "wanda":
                score = w.abs() * norms[(i, n)][None]
                k = int(w.shape[1] * rates[i])
                thresh = score.sort(dim=1).values[:, k - 1:k]  # the k-th lowest score of each row
                expect = score <= thresh
            else:
                score = w.abs().flatten()
                k = int(score.numel() * rates[i])
                expect = (score <= score.sort().values[k - 1]).reshape(w.shape)
            got = lin.weight == 0
            assert torch.equal(got, expect), (i, n)
            assert torch.equal(lin.weight[~got], dense[(i, n)][~got])
    db.apply([0.0, 0.0, 0.0])
    assert all(torch.equal(lin.weight, dense[(i, n)]) for i, b in enumerate(get_blocks(model))
               for n, lin in block_linears(model, b).items())
    db.apply(rates)
    db.restore()
    assert all(torch.equal(lin.weight, dense[(i, n)]) for i, b in enumerate(get_blocks(model))
               for n, lin in block_linears(model, b).items())


def _c4_ppl(model, tokenizer, windows, seqlen):
    from sparsellm.data import eval_tokens

    ids = eval_tokens(tokenizer, "c4", seqlen)[0, :windows * seqlen].reshape(windows, seqlen)
    with torch.no_grad():
        logits = model(ids).logits.double()
    nll = sum(F.cross_entropy(logits[i, :-1], ids[i, 1:], reduction="sum").item() for i in range(windows))
    return math.exp(nll / (windows * (seqlen - 1)))


@pytest.mark.parametrize("loop", ["ga", "evopress"])
def test_searched_rates_mean_band_and_reported_fitness(loop, tokenizer):
    from sparsellm import PruneConfig, resolve_allocation

    model = make_model("llama", num_hidden_layers=4)
    dense = [lin.weight.detach().clone() for b in get_blocks(model) for lin in block_linears(model, b).values()]
    ids = _calib()
    pc = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, allocation="search", search_loop=loop,
                               search_budget=24, search_lambda=0.2, search_windows=2, search_seqlen=16)
    rates, info = resolve_allocation(model, pc, ids, progress=False, tokenizer=tokenizer)
    assert abs(sum(rates) / 4 - 0.6) < 1e-9 and all(0.4 - 1e-9 <= r <= 0.8 + 1e-9 for r in rates)
    assert info["evals"] <= 24 and info["generations"] >= 1 and info["search_loop"] == loop
    # the model is left dense
    assert all(torch.equal(a, lin.weight) for a, lin in
               zip(dense, [lin for b in get_blocks(model) for lin in block_linears(model, b).values()]))
    # the reported fitnesses are the C4 perplexities of the database's masks, computed here
    db = MaskDatabase(model, ids, "wanda", progress=False)
    db.apply(rates)
    assert info["best_fitness"] == pytest.approx(_c4_ppl(model, tokenizer, 2, 16), rel=1e-4)
    db.apply([0.6] * 4)
    assert info["uniform_fitness"] == pytest.approx(_c4_ppl(model, tokenizer, 2, 16), rel=1e-4)
    db.restore()
    if loop == "ga":  # the uniform vector is in the GA's first population, and survival is elitist
        assert info["best_fitness"] <= info["uniform_fitness"]


@pytest.mark.parametrize("kw,match", [
    ({"search_lambda": 0.5}, "search_lambda"), ({"search_lambda": 0.0}, "search_lambda"),
    ({"search_budget": 3}, "search_budget"), ({"search_loop": "llm"}, "search_loop"),
    ({"search_windows": 0}, "search_windows"),
])
def test_search_config_bad_input(kw, match):
    with pytest.raises(UsageError, match=match):
        RateSearchConfig(**kw).validate(0.7)


def test_search_needs_a_tokenizer():
    from sparsellm import PruneConfig, resolve_allocation

    pc = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, allocation="search")
    with pytest.raises(UsageError, match="tokenizer"):
        resolve_allocation(make_model("llama"), pc, _calib(), progress=False)


def test_cli_allocate_search_end_to_end(tmp_path, saved_model_dir, calib_txt):
    import json

    from sparsellm.cli import main

    out = tmp_path / "a"
    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--prune_method", "wanda",
                 "--sparsity_ratio", "0.5", "--allocation", "search", "--search_budget", "24", "--search_lambda", "0.2",
                 "--search_windows", "2", "--search_seqlen", "16", "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--save", str(out)]) == 0
    rates = json.loads((out / "rates.json").read_text())
    assert len(rates) == 2 and abs(sum(rates) / 2 - 0.5) < 1e-9
    rep = json.loads((out / "report.json").read_text())
    assert rep["allocation"]["name"] == "search" and rep["allocation"]["search_budget"] == 24


@pytest.mark.parametrize("kw,match", [
    ({"search_loop": "evopress", "search_budget": 23, "search_windows": 1}, "less than one EvoPress generation"),
    ({"search_loop": "ga", "search_budget": 15}, "less than one GA generation"),
    ({"search_loop": "evopress", "search_budget": 24, "search_windows": 20}, "pool"),  # 320 > 256 windows
])
def test_search_refuses_a_budget_or_pool_it_cannot_use(kw, match, tokenizer):
    """Breaker findings: a budget below one generation used to return uniform rates silently, and a pool past
    the bundled C4 windows scored candidates on fewer windows than it said."""
    from sparsellm import PruneConfig, resolve_allocation

    pc = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, allocation="search", search_seqlen=16, **kw)
    with pytest.raises(UsageError, match=match):
        resolve_allocation(make_model("llama"), pc, _calib(), progress=False, tokenizer=tokenizer)
