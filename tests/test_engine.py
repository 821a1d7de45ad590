"""The sequential block-wise engine: captured inputs and per-block kwargs must reproduce the full model."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_model
from sparsellm.engine import capture_inputs, linear_sparsity, prune_blocks

NSAMPLES, SEQLEN = 3, 24  # seqlen > sliding_window (8) so sliding and full attention layers differ


def _blocks(model):
    if model.config.model_type == "opt":
        return model.model.decoder.layers
    return model.model.layers


def _reference_block_outputs(model, ids, per_window=False):
    """Outputs of every decoder block during a plain forward of the full model (forward hooks)."""
    outs = {i: [] for i in range(len(_blocks(model)))}

    def hook(i):
        def fn(mod, args, out):
            outs[i].append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(_blocks(model))]
    try:
        with torch.no_grad():
            if per_window:
                for s in range(ids.shape[0]):
                    model(ids[s : s + 1], use_cache=False)
            else:
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in outs.items()}


def _engine_outputs(model, ids, method, rates, **kw):
    got = {}
    results = prune_blocks(model, ids, method, rates, progress=False,
                           on_block_end=lambda i, X, *_: got.__setitem__(i, X.detach().clone()), **kw)
    return got, results


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES + ["llama_untied"])
def test_sparsity_zero_reproduces_every_block(family, attn):
    model = make_model(family, attn=attn)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN))
    ref = _reference_block_outputs(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    L = len(_blocks(model))
    got, results = _engine_outputs(model, ids, "wanda", [0.0] * L)
    assert sorted(got) == list(range(L))
    for i in range(L):
        assert got[i].shape == ref[i].shape == (NSAMPLES, SEQLEN, model.config.hidden_size)
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5, msg=f"block {i}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [r["block"] for r in results] == list(range(L))
    assert all(r["rel_error"] == 0.0 for r in results)


def test_gemma3_layer_kwargs_really_differ():
    """Guard for the test above: with these settings sliding and full attention layers give different outputs,
    so reusing one block's kwargs for another would be caught."""
    model = make_model("gemma3")
    ids = torch.randint(0, 128, (1, SEQLEN))
    X, kwargs = capture_inputs(model, ids)
    assert len(kwargs) == 3 and all(k is not None for k in kwargs)
    block = model.model.layers[0]
    with torch.no_grad():
        own = block(X, **kwargs[0])
        other = block(X, **kwargs[1])
    own = own[0] if isinstance(own, tuple) else own
    other = other[0] if isinstance(other, tuple) else other
    assert (own - other).abs().max() > 1e-4


def test_capture_inputs_equals_embedding_output(family):
    model = make_model(family)
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    captured = {}

    def pre_hook(mod, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    h = _blocks(model)[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    X, kwargs = capture_inputs(model, ids)
    assert X.shape == (NSAMPLES, SEQLEN, model.config.hidden_size)
    torch.testing.assert_close(X, captured["x"], atol=1e-6, rtol=0)
    assert len(kwargs) == len(_blocks(model))


def test_magnitude_runs_without_calibration_forwards(monkeypatch):
    """Magnitude needs no data: the engine must not run any block, and still prune exactly."""
    import sparsellm.engine as engine

    model = make_model("llama")
    monkeypatch.setattr(engine, "capture_inputs", lambda *a, **k: pytest.fail("magnitude ran a forward"))
    results = prune_blocks(model, torch.randint(0, 128, (NSAMPLES, SEQLEN)), "magnitude", [0.5] * 2, progress=False)
    assert [r["rel_error"] for r in results] == [None, None]
    for block in _blocks(model):
        for lin in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
            assert int((lin.weight == 0).sum()) == int(lin.weight.numel() * 0.5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_next_block_inputs_come_from_pruned_model(method):
    """After pruning, block i's reported outputs equal what the *pruned* model computes at block i."""
    model = make_model("qwen2")
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    got, results = _engine_outputs(model, ids, method, [0.5, 0.5], options={"blocksize": 16})
    ref = _reference_block_outputs(model, ids)
    for i in range(2):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)
    assert all(r["rel_error"] > 0 for r in results)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_batch_size_does_not_change_results(family):
    model = make_model(family)
    ids = torch.randint(0, 128, (4, SEQLEN))
    ref = _reference_block_outputs(model, ids)
    L = len(_blocks(model))
    got, _ = _engine_outputs(model, ids, "wanda", [0.0] * L, batch_size=2)
    for i in range(L):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)


def test_results_report_measured_sparsity(family):
    model = make_model(family)
    ids = torch.randint(0, 128, (2, 16))
    L = len(_blocks(model))
    rates = [0.25 + 0.25 * (i % 2) for i in range(L)]
    results = prune_blocks(model, ids, "wanda", rates, progress=False)
    total_zeros = total = 0
    for i, (block, res) in enumerate(zip(_blocks(model), results)):
        lin = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(res["modules"]) == set(lin)
        z = sum(int((m.weight == 0).sum()) for m in lin.values())
        n = sum(m.weight.numel() for m in lin.values())
        assert res["target"] == rates[i]
        assert res["measured"] == pytest.approx(z / n)
        for name, m in lin.items():
            assert res["modules"][name]["measured"] == pytest.approx(float((m.weight == 0).sum()) / m.weight.numel())
            assert res["modules"][name]["target"] == rates[i]
            # wanda: floor(in * rate) per row
            assert int((m.weight == 0).sum()) == m.out_features * int(m.in_features * rates[i])
        total_zeros += z
        total += n
    ls = linear_sparsity(model)
    assert ls["zeros"] == total_zeros and ls["params"] == total
    assert ls["sparsity"] == pytest.approx(total_zeros / total)


def test_wrong_number_of_rates_raises():
    model = make_model("llama")
    with pytest.raises(ValueError):
        prune_blocks(model, torch.randint(0, 128, (1, 8)), "magnitude", [0.5], progress=False)


def _linear_inputs(model, block_idx):
    """Every linear's input in block `block_idx` during a plain forward, keyed by name inside the block."""
    block = _blocks(model)[block_idx]
    got, handles = {}, []
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: got.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    return got, handles


def _brute_wanda_mask(W, X, s):
    import numpy as np

    Wn, Xn = W.detach().double().numpy(), X.detach().double().numpy()
    norms = np.sqrt((Xn ** 2).sum(0))
    k = int(W.shape[1] * s)
    mask = np.zeros(W.shape, dtype=bool)
    for r in range(W.shape[0]):
        mask[r, np.argsort(np.abs(Wn[r]) * norms, kind="stable")[:k]] = True
    return torch.from_numpy(mask)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_wanda_in_engine_uses_each_linears_own_inputs(family):
    """Engine-level Wanda equals a brute-force ranking over the inputs each linear really sees: for block 0 the
    dense model's, for block 1 those of a model whose block 0 is already pruned (sequential pruning)."""
    import copy

    model = make_model(family)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    prune_blocks(model, ids, "wanda", [0.5] * len(_blocks(model)), batch_size=2, progress=False)
    ref = copy.deepcopy(dense)
    for b in range(2):
        if b == 1:  # the reference sees block 0 pruned, block 1 still dense
            ref_block0 = _blocks(ref)[0]
            ref_block0.load_state_dict(_blocks(model)[0].state_dict())
        inputs, handles = _linear_inputs(ref, b)
        with torch.no_grad():
            ref(ids, use_cache=False)
        for h in handles:
            h.remove()
        for name, mod in _blocks(model)[b].named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            W_dense = _blocks(dense)[b].get_submodule(name).weight
            expected = _brute_wanda_mask(W_dense, torch.cat(inputs[name]), 0.5)
            assert torch.equal(mod.weight == 0, expected), f"block {b} {name}"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batch_size_does_not_change_pruned_weights(method):
    ids = torch.randint(0, 128, (4, SEQLEN))
    weights = []
    for bs in (1, 3, None):
        model = make_model("mistral")
        prune_blocks(model, ids, method, [0.5, 0.5], batch_size=bs, options={"blocksize": 16}, progress=False)
        weights.append({k: v for k, v in model.state_dict().items() if "proj" in k})
    for other in weights[1:]:
        for k, v in weights[0].items():
            assert torch.equal(v == 0, other[k] == 0), k
            torch.testing.assert_close(v, other[k], atol=1e-5, rtol=1e-4)
