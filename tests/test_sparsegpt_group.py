"""SparseGPT on linears that share one input, stacked into one OBS (`sparsegpt.prune_group`, the engine's
`_prune_linears`), against `sparsegpt.prune` called here on each weight alone (itself checked against a
naive float64 Algorithm 1 in test_sparsegpt_reference.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_model
from sparsellm import block_work, engine
from sparsellm.models import block_linears, get_blocks
from sparsellm.prune import LayerStats, sparsegpt
from sparsellm.prune.masks import NM
from sparsellm.registry import get


def _setup(seed=0, cols=48, rows=(24, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / 2)
    X = X * (torch.rand(cols, generator=g) * 3 + 0.1)  # correlated inputs: the OBS updates are large
    X[:, 5] = 0.0  # a dead input
    st = LayerStats()
    st.add(X, "hessian")
    return [torch.randn(r, cols, generator=g) for r in rows], st


def _check(weights, st, rates, nm, blocksize, zeros_kept=()):
    stacked = sparsegpt.prune_group(weights, st, rates, nm, blocksize=blocksize)
    for k, (w, r, out) in enumerate(zip(weights, rates, stacked)):
        alone = sparsegpt.prune(w.clone(), st, r, nm, blocksize=blocksize)
        assert out.shape == w.shape
        assert torch.equal(out == 0, alone == 0), f"weight {k}: masks differ"
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-6 * float(alone.abs().max()))
        if k in zeros_kept:
            assert (out[w == 0] == 0).all()
    return stacked


@pytest.mark.parametrize("rates,blocksize", [((0.5, 0.5, 0.5), 16), ((0.6, 0.3, 0.75), 16),
                                             ((0.6, 0.3, 0.75), 128), ((0.5, 0.0, 0.7), 20)])
def test_unstructured_with_per_linear_rates(rates, blocksize):
    weights, st = _setup()
    out = _check(weights, st, list(rates), None, blocksize)
    for w, r, o in zip(weights, rates, out):  # each weight's own floor(numel · rate) per column block
        if r == 0:
            assert torch.equal(o, w)
        for i in range(0, 48, blocksize):
            blk = o[:, i:i + blocksize]
            assert int((blk == 0).sum()) >= int(blk.numel() * r)


@pytest.mark.parametrize("nm,blocksize", [(NM(2, 4), 16), (NM(4, 8), 12)])
def test_nm(nm, blocksize):
    weights, st = _setup(1)
    _check(weights, st, [nm.sparsity] * 3, nm, blocksize)


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
def test_already_sparse_inputs_per_linear(nm):
    """One weight already 50% sparse (its zeros stay zero), one with a few incidental zeros (below
    masks.ALREADY_SPARSE: treated as dense), one dense: as each alone."""
    weights, st = _setup(2)
    g = torch.Generator().manual_seed(3)
    weights[1] = weights[1].masked_fill(torch.rand(weights[1].shape, generator=g) < 0.5, 0.0)
    # 0.9% zeros in weight 0's last column block: the updates of the earlier blocks refill them, and at
    # rate 0.02 (7 of that block's 384 weights) some stay non-zero, as a mask that kept them would not
    rows, cols = torch.arange(10), torch.arange(34, 44)
    weights[0][rows, cols] = 0.0
    rate = nm.sparsity if nm else 0.7
    first = nm.sparsity if nm else 0.02
    _check(weights, st, [first, rate, 0.6 if nm is None else rate], nm, 16, zeros_kept=(1,))
    alone = sparsegpt.prune(weights[0], st, first, nm, blocksize=16)
    assert (alone[rows, cols] != 0).any()


def test_bf16_weights_are_read_not_modified():
    weights, st = _setup(4)
    weights = [w.bfloat16() for w in weights]
    before = [w.clone() for w in weights]
    _check(weights, st, [0.5] * 3, None, 16)
    assert all(torch.equal(a, b) for a, b in zip(weights, before))


def _prune_llama(monkeypatch, group: bool, rate, nm=None):
    model = make_model("llama")
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    method = get("pruner", "sparsegpt")
    calls = []

    def spy(weights, *a, **kw):
        calls.append(len(weights))
        return method.group(weights, *a, **kw)

    fake = dataclasses.replace(method, group=spy if group else None)
    monkeypatch.setattr(engine, "get", lambda kind, name: fake)
    res = engine.prune_blocks(model, ids, "sparsegpt", [rate] * 2, nm=nm, options={"blocksize": 8},
                              progress=False)
    weights = {f"{i}.{n}": lin.weight.detach().clone() for i, b in enumerate(get_blocks(model))
               for n, lin in block_linears(model, b).items()}
    return weights, res, calls


@pytest.mark.parametrize("rate,nm", [(0.5, None), ({"q": 0.6, "k": 0.4, "v": 0.5, "o": 0.5, "gate": 0.55,
                                                     "up": 0.0, "down": 0.5}, None), (0.5, NM(2, 4))])
def test_engine_stacks_shared_inputs_with_the_same_result(monkeypatch, rate, nm):
    if isinstance(rate, dict):  # per-linear rates (OWL's layer granularity), keyed "self_attn.q_proj", ...
        model = make_model("llama")
        rate = {n: rate[n.split(".")[-1].split("_")[0]] for n in block_linears(model, get_blocks(model)[0])}
    stacked, res_s, calls = _prune_llama(monkeypatch, True, rate, nm)
    alone, res_a, calls_a = _prune_llama(monkeypatch, False, rate, nm)
    assert calls_a == []
    # q/k/v stacked in each block; gate/up too unless one of them is at rate 0 (then the other alone)
    assert calls == [3, 2, 3, 2] if not isinstance(rate, dict) else calls == [3, 3]
    for key in alone:
        assert torch.equal(stacked[key] == 0, alone[key] == 0), key
        torch.testing.assert_close(stacked[key], alone[key], rtol=0, atol=1e-6 * float(alone[key].abs().max()))
    for a, b in zip(res_s, res_a):
        assert a["modules"] == b["modules"] and a["refilled"] == b["refilled"] and a["zeros"] == b["zeros"]


def test_prune_linears_on_a_subset():
    """The helper prunes only the linears it is given and pops only their statistics."""
    model = make_model("llama")
    block = get_blocks(model)[0]
    linears = block_linears(model, block)
    X = torch.randn(64, 32)
    shared = LayerStats()
    shared.add(X, "hessian")
    subset = {n: linears[n] for n in linears if n.endswith(("q_proj", "k_proj", "v_proj"))}
    other = next(n for n in linears if n not in subset)
    stats = {**{n: shared for n in subset}, other: LayerStats()}
    ref = {n: sparsegpt.prune(lin.weight.detach().clone(), shared, 0.5, None) for n, lin in subset.items()}
    untouched = linears[other].weight.detach().clone()
    modules, refilled = block_work.prune_linears(model, 0, subset, get("pruner", "sparsegpt"), stats, 0.5, None, {})
    assert list(modules) == list(subset) and refilled == 0 and list(stats) == [other]
    assert torch.equal(linears[other].weight, untouched)
    for n, lin in subset.items():
        assert torch.equal(lin.weight == 0, ref[n] == 0)
        assert modules[n]["target"] == 0.5 and modules[n]["input"] == 0.0
        assert modules[n]["measured"] == float((lin.weight == 0).sum()) / lin.weight.numel()
