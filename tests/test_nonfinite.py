"""Non-finite numbers never pass silently: a NaN/inf weight, calibration statistic, pruned weight or
perplexity loss stops with one line that names the module (or window), exit status 2, nothing written."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from conftest import make_model
from sparsellm import registry
from sparsellm.cli import main
from sparsellm.engine import capture_inputs, prune_blocks
from sparsellm.errors import NonFiniteError
from sparsellm.evaluate import perplexity
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.prune.sparsegpt import inverse_cholesky

DOWN = "model.layers.1.mlp.down_proj"


def _calib(n=2, seqlen=32):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _poisoned(value=float("nan"), where=DOWN, count=2):
    model = make_model("llama")
    w = model.get_submodule(where).weight.data
    w.view(-1)[torch.arange(count) * 7] = value
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_stops_pruning_before_any_work(method, value, tokenizer):
    model = _poisoned(value)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError) as e:
        prune(model, tokenizer, PruneConfig.from_flat(prune_method=method, nsamples=2, seqlen=32),
              calib_ids=_calib(), progress=False)
    assert str(e.value) == f"{DOWN}: weight has 2 NaN/inf values"
    for k, v in model.state_dict().items():  # untouched
        assert torch.equal(v.nan_to_num(), state[k].nan_to_num()), k


def _tree(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _one_line(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def test_cli_nonfinite_weight_is_one_line_and_exit_2(tmp_path, tokenizer, calib_txt, capsys):
    d = tmp_path / "model"
    _poisoned().save_pretrained(d)
    tokenizer.save_pretrained(d)
    before = _tree(tmp_path)
    code, err = _one_line(capsys, ["--quiet", "prune", "--model", str(d), "--calib_dataset", str(calib_txt),
                                   "--nsamples", "2", "--seqlen", "16", "--prune_method", "wanda",
                                   "--eval", "wikitext2", "--eval_seqlen", "32", "--out", str(tmp_path / "out")])
    assert code == 2 and err == [f"sparsellm: error: {DOWN}: weight has 2 NaN/inf values"]
    assert _tree(tmp_path) == before
    code, err = _one_line(capsys, ["--quiet", "eval", "ppl", "--model", str(d), "--seqlen", "32", "--max_windows", "2"])
    assert code == 2 and err == [f"sparsellm: error: {DOWN}: weight has 2 NaN/inf values"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nonfinite_statistics_name_the_module_without_damping_retries(method, caplog):
    """Inputs that overflowed (here: an inf in block 0's captured inputs) are caught in the statistics,
    before Wanda's scores or SparseGPT's damping see them (which used to retry "damping nan" seven times)."""
    model = make_model("llama")
    X, kwargs = capture_inputs(model, _calib())
    X[1, 5, 3] = float("inf")
    with caplog.at_level(logging.WARNING, logger="sparsellm"), pytest.raises(NonFiniteError) as e:
        prune_blocks(model, None, method, [0.5, 0.5], captured=(X, kwargs), progress=False,
                     options={"blocksize": 8, "percdamp": 0.01} if method == "sparsegpt" else {})
    assert str(e.value).startswith("model.layers.0.self_attn.q_proj: calibration statistics (input ")
    assert "NaN/inf values" in str(e.value)
    assert not [r for r in caplog.records if "Cholesky" in r.getMessage()]


def test_sparsegpt_nonfinite_hessian_is_not_retried(caplog):
    H = torch.eye(8)
    H[2, 3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="sparsellm"), pytest.raises(NonFiniteError, match="1 NaN/inf"):
        inverse_cholesky(H, 0.01)
    assert not caplog.records


def test_nonfinite_pruned_weight_names_the_module(monkeypatch, tokenizer):
    m = registry.get("pruner", "magnitude")
    monkeypatch.setitem(registry._METHODS["pruner"], "magnitude",
                        dataclasses.replace(m, fn=lambda w, *a, **k: w.masked_fill(w.abs() < 1e-3, float("nan"))))
    model = make_model("llama")
    with pytest.raises(NonFiniteError, match=r"^model\.layers\.0\.self_attn\.q_proj: the magnitude-pruned weight has"):
        prune(model, tokenizer, PruneConfig.from_flat(prune_method="magnitude", sparsity_ratio=0.5), progress=False)


def test_nonfinite_perplexity_is_an_error_not_nan(tokenizer):
    """Logits that are NaN (a NaN in the final norm) used to give ppl nan; now the window is named."""
    model = make_model("llama")
    model.model.norm.weight.data[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^wikitext2 perplexity: the loss of window 1 of 2 is nan"):
        perplexity(model, tokenizer, "wikitext2", seqlen=32, max_windows=2, progress=False)
