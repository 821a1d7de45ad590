"""Layer-wise allocation: uniform, ATP (fixed β) and rates from a file; measured per-block sparsity equals
the allocated rate for every pruner."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model
from sparsellm.allocate import atp, check_rates
from sparsellm.allocate.from_file import FileConfig
from sparsellm.errors import UsageError
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.registry import get


def allocate(name, L, S, **options):
    """The registered allocator `name` ("atp" or "file:PATH") on a tiny model with L decoder blocks."""
    model = make_model("llama", num_hidden_layers=L)
    if name.startswith("file:"):
        cfg = FileConfig(path=name[5:], allow_mean_mismatch=options.get("mean_tolerance", 1e-6) is None)
        return get("allocator", "file").fn(model, None, S, cfg)[0]
    method = get("allocator", name)
    return method.fn(model, None, S, method.config(**options))[0]


@pytest.mark.parametrize("L", [2, 7, 30, 80])
@pytest.mark.parametrize("S", [0.1, 0.5, 0.7, 0.9])
def test_atp_mean_monotone_and_bounded(L, S):
    bmax = atp.beta_max(L, S)
    assert bmax == pytest.approx(min(2 * S / (L - 1), 2 * (1 - S) / (L - 1)))
    for beta in (0.0, bmax / 3, bmax * 0.999):
        r = allocate("atp", L, S, atp_beta=beta)
        assert len(r) == L and sum(r) / L == pytest.approx(S, abs=1e-9)
        assert all(b - a == pytest.approx(beta, abs=1e-12) for a, b in zip(r, r[1:]))  # arithmetic, rising
        assert all(0.0 <= x < 1.0 for x in r)
        # the paper's formula, written out independently: s_i = S − β(L−1)/2 + β(i−1), i = 1..L
        assert r == pytest.approx([S - beta * (L - 1) / 2 + beta * (i - 1) for i in range(1, L + 1)], abs=1e-12)


def test_atp_beta_outside_range_is_an_error():
    with pytest.raises(UsageError, match="outside"):
        allocate("atp", 30, 0.7, atp_beta=atp.beta_max(30, 0.7) * 1.01)
    with pytest.raises(UsageError, match="outside"):
        allocate("atp", 30, 0.7, atp_beta=-0.001)
    with pytest.raises(UsageError, match="sparsity 1"):  # β_max at S >= 0.5 puts the last block at exactly 1
        allocate("atp", 30, 0.7, atp_beta=atp.beta_max(30, 0.7))


def test_rates_file_list_and_dict(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps([0.4, 0.5, 0.6]))
    assert allocate(f"file:{f}", 3, 0.5) == pytest.approx([0.4, 0.5, 0.6])
    f.write_text(json.dumps({"2": 0.6, "0": 0.4, "1": 0.5}))
    assert allocate(f"file:{f}", 3, 0.5) == pytest.approx([0.4, 0.5, 0.6])


@pytest.mark.parametrize("content,match", [
    ([0.5, 0.5], "2 rates for 3"),
    ([0.5, 0.5, 1.0], r"\[0, 1\)"),
    ([0.5, 0.5, -0.1], r"\[0, 1\)"),
    ([0.5, 0.5, 0.6], "mean"),
    ({"0": 0.5, "1": 0.5}, "block indices"),
    ({"a": 0.5}, "block indices"),
    (["x", 0.5, 0.5], "numbers"),
    ("not json{", "valid JSON"),
])
def test_rates_file_bad_input(tmp_path, content, match):
    f = tmp_path / "r.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UsageError, match=match):
        allocate(f"file:{f}", 3, 0.5)


def test_rates_file_mean_may_be_waived(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps([0.5, 0.5, 0.8]))
    assert allocate(f"file:{f}", 3, 0.5, mean_tolerance=None)[2] == 0.8


def test_check_rates_and_unknown_allocator():
    with pytest.raises(UsageError):
        check_rates([0.5], 0, 0.5)
    with pytest.raises(UsageError, match="unknown allocation"):
        PruneConfig(allocation="owl-typo").validate()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["atp", "file"])
def test_measured_block_sparsity_equals_allocated_rate(method, allocation, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = make_model("llama")
    L = len(model.model.layers)
    kwargs = {}
    blocksize = {"blocksize": 16} if method == "sparsegpt" else {}
    if allocation == "atp":
        cfg = PruneConfig.from_flat(prune_method=method, sparsity_ratio=0.5, nsamples=2, seqlen=16, allocation="atp",
                                    atp_beta=0.2, **blocksize)
        expected = [0.5 - 0.2 * (L - 1) / 2 + 0.2 * i for i in range(L)]
    else:
        expected = [0.25, 0.75][:L]
        f = tmp_path / "r.json"
        f.write_text(json.dumps(expected))
        cfg = PruneConfig.from_flat(prune_method=method, sparsity_ratio=0.5, nsamples=2, seqlen=16,
                                    allocation=f"file:{f}", **blocksize)
    report = prune(model, tokenizer, cfg, calib_ids=torch.randint(0, 100, (2, 16)), progress=False, **kwargs)
    assert report["allocation"]["rates"] == pytest.approx(expected)
    for i, block in enumerate(model.model.layers):
        for name, lin in ((n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)):
            zeros = int((lin.weight == 0).sum())
            if method == "magnitude":
                assert zeros == int(lin.weight.numel() * expected[i]), name
            elif method == "wanda":
                assert zeros == lin.out_features * int(lin.in_features * expected[i]), name
            else:  # SparseGPT: per 16-column block, floor(numel · s) (plus any exact zeros of dead inputs)
                assert zeros >= sum(int(lin.out_features * min(16, lin.in_features - c) * expected[i])
                                    for c in range(0, lin.in_features, 16)), name
