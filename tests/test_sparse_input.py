"""Pruning an already sparse model again (e.g. 50% → 70%): every pruner keeps the input's zeros, unstructured
and N:M, and the report, the sidecar and the terminal text say the input was already sparse.
(SparseGPT against its float64 reference on sparse inputs: tests/test_sparsegpt_reference.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_model
from sparsellm.cli import main
from sparsellm.pipeline import PruneConfig, prune, sparsity_sidecar
from sparsellm.prune import LayerStats
from sparsellm.prune.masks import NM
from sparsellm.registry import get

ROWS, COLS = 24, 64


def _sparse_layer(seed=0, zeros=0.5):
    """W (ROWS, COLS) with a random `zeros` fraction of exact zeros, and strongly correlated inputs X."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ROWS, COLS, generator=g)
    W[torch.rand(ROWS, COLS, generator=g) < zeros] = 0.0
    A = torch.eye(COLS) + 2.0 * torch.randn(COLS, COLS, generator=g) / math.sqrt(COLS)
    X = (torch.randn(200, COLS, generator=g) @ A) * torch.linspace(0.5, 2.0, COLS)
    st = LayerStats()
    st.add(X, "hessian")
    return W, st


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity,nm", [(0.7, None), (0.3, None), (0.5, NM(2, 4)), (0.75, NM(1, 4))])
def test_every_pruner_keeps_the_zeros_of_a_sparse_weight(method, sparsity, nm, seed):
    W, st = _sparse_layer(seed)
    zeros = W == 0
    out = get("pruner", method).fn(W.clone(), st, sparsity, nm, blocksize=16, percdamp=0.01)
    assert not out[zeros].any(), f"{int((out[zeros] != 0).sum())} zeros of the input were refilled"
    if nm is not None:
        assert ((out != 0).reshape(ROWS, COLS // nm.m, nm.m).sum(-1) <= nm.n).all()
    elif method == "magnitude":  # one threshold per matrix: max(its zeros, floor(numel · s))
        assert int((out == 0).sum()) == max(int(zeros.sum()), math.floor(W.numel() * sparsity))
    elif method == "wanda":  # per output row
        expect = [max(int(z), math.floor(COLS * sparsity)) for z in zeros.sum(1)]
        assert (out == 0).sum(1).tolist() == expect
    else:  # per block of 16 columns
        for i in range(0, COLS, 16):
            z, blk = zeros[:, i:i + 16], out[:, i:i + 16]
            assert int((blk == 0).sum()) == max(int(z.sum()), math.floor(blk.numel() * sparsity))


def _calib(n=4, seqlen=32, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _linears(model):
    return {n: m.weight for n, m in model.named_modules() if n.startswith("model.layers.") and
            isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_a_pruned_model_again_keeps_its_zeros(method, tokenizer):
    """50% → 70% on a whole tiny model with block size 8 (every linear is wider): no zero comes back, and
    the report says the input was already sparse."""
    model = make_model("llama", seed=3)
    kw = dict(prune_method=method, nsamples=4, seqlen=32, **({"blocksize": 8} if method == "sparsegpt" else {}))
    first = prune(model, tokenizer, PruneConfig.from_flat(sparsity_ratio=0.5, **kw), calib_ids=_calib(), progress=False)
    assert first["input"]["sparsity"] == 0.0 and first["input_already_sparse"] is False
    assert first["input"]["refilled"] == 0
    before = {n: (w == 0).clone() for n, w in _linears(model).items()}
    zeros = sum(int(z.sum()) for z in before.values())
    report = prune(model, tokenizer, PruneConfig.from_flat(sparsity_ratio=0.7, **kw), calib_ids=_calib(seed=1),
                   progress=False)
    refilled = sum(int((w[before[n]] != 0).sum()) for n, w in _linears(model).items())
    assert refilled == 0, f"{refilled} zeros were refilled"
    total = sum(w.numel() for w in _linears(model).values())
    assert report["input"]["zeros"] == zeros
    assert report["input"]["sparsity"] == pytest.approx(zeros / total)
    assert report["input_already_sparse"] is True
    assert report["input"]["refilled"] == 0
    assert report["measured"]["sparsity"] >= 22 / 32  # floor(0.7 · 32) per row of the 32-wide linears
    side = sparsity_sidecar(model, report)
    assert side["input_sparsity"] == pytest.approx(zeros / total) and side["input_already_sparse"] is True
    for name, z in before.items():  # per module: the fraction of zeros before this prune
        assert side["modules"][name]["input"] == pytest.approx(float(z.sum()) / z.numel())


def test_cli_sidecar_and_text_say_the_input_was_already_sparse(tmp_path, saved_model_dir, calib_txt, capsys):
    common = ["--quiet", "prune", "--calib_dataset", str(calib_txt), "--nsamples", "4", "--seqlen", "16",
              "--eval", "none", "--prune_method", "sparsegpt", "--blocksize", "8"]
    assert main([*common, "--model", str(saved_model_dir), "--sparsity_ratio", "0.5", "--out", str(tmp_path / "a")]) == 0
    dense = json.loads((tmp_path / "a" / "sparsity_config.json").read_text())
    assert dense["input_sparsity"] == 0.0 and dense["input_already_sparse"] is False
    assert "already sparse" not in capsys.readouterr().out
    assert main([*common, "--model", str(tmp_path / "a"), "--sparsity_ratio", "0.7", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    side = json.loads((tmp_path / "b" / "sparsity_config.json").read_text())
    assert side["input_sparsity"] == pytest.approx(dense["global_sparsity"])
    assert side["input_already_sparse"] is True
    assert f"the input was already sparse: {dense['global_sparsity']:.4f}" in out
    assert "all of them were kept" in out
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for name in side["modules"]:
        w0, w1 = a[name + ".weight"], b[name + ".weight"]
        assert not w1[w0 == 0].any(), name


def test_refilled_zeros_are_counted_not_claimed_kept(tokenizer, monkeypatch):
    """Zeros that come back non-zero (SparseGPT on a linear under 1% zeros, pruned as dense exactly as the
    published algorithm does) are counted in the report, so the summary never claims they were kept.
    Here a stand-in pruner sets every zero to 1."""
    import dataclasses

    from sparsellm import registry
    from sparsellm.report import summary_table

    m = registry.get("pruner", "magnitude")
    monkeypatch.setitem(registry._METHODS["pruner"], "magnitude",
                        dataclasses.replace(m, fn=lambda w, *a, **k: w.masked_fill(w == 0, 1.0)))
    model = make_model("llama", seed=3)
    lin = _linears(model)
    g = torch.Generator().manual_seed(0)
    for w in lin.values():
        w.data.view(-1)[torch.randperm(w.numel(), generator=g)[: w.numel() // 50]] = 0.0  # 2%
    zeros = sum(int((w == 0).sum()) for w in lin.values())
    report = prune(model, tokenizer, PruneConfig.from_flat(prune_method="magnitude", sparsity_ratio=0.5),
                   progress=False)
    assert report["input"]["zeros"] == zeros and report["input"]["refilled"] == zeros
    text = summary_table({"prune": report})
    assert f"{zeros:,} of them are non-zero now" in text and "were kept" not in text
