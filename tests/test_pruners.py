"""The three pruners on single random layers: brute-force references, exact sparsity, N:M patterns, and
SparseGPT's reconstruction advantage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsellm.prune import LayerStats, magnitude, sparsegpt, wanda
from sparsellm.registry import get, names

PRUNERS = {n: get("pruner", n) for n in names("pruner")}
from sparsellm.errors import UsageError
from sparsellm.prune.masks import NM

ROWS, COLS, TOKENS = 16, 64, 256


def _layer(seed=0, rows=ROWS, cols=COLS, tokens=TOKENS, correlated=True, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    Z = torch.randn(tokens, cols, generator=g)
    if correlated:  # correlated features with very different scales
        A = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
        X = (Z @ A) * torch.logspace(-spread, spread, cols)
    else:
        X = Z
    return W, X


def _stats(X, need, chunks=3):
    st = LayerStats()
    for part in X.chunk(chunks):
        st.add(part.reshape(1, -1, X.shape[-1]), need)  # (batch, tokens, C_in) like a block forward
    return st


def test_layer_stats_accumulate():
    _, X = _layer()
    st = _stats(X, "hessian")
    Xd = X.double().numpy()
    assert st.ntokens == TOKENS
    np.testing.assert_allclose(st.sq_norm.numpy(), (Xd ** 2).sum(0), rtol=1e-4)
    np.testing.assert_allclose(st.hessian.numpy(), Xd.T @ Xd, rtol=1e-4, atol=1e-2)
    st_norm = _stats(X, "norm")
    assert st_norm.hessian is None and st_norm.ntokens == TOKENS
    st_none = _stats(X, "none")
    assert st_none.sq_norm is None and st_none.hessian is None


def test_pruner_table():
    assert set(PRUNERS) == {"magnitude", "wanda", "sparsegpt"}
    assert tuple(PRUNERS[n].needs for n in ("magnitude", "wanda", "sparsegpt")) == ("none", "norm", "hessian")


# ------------------------------------------------------------------ Wanda vs. brute force


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_wanda_unstructured_matches_brute_force(s):
    W, X = _layer(seed=3)
    Wn, Xn = W.double().numpy(), X.double().numpy()
    norms = [math.sqrt(sum(float(Xn[t, j]) ** 2 for t in range(TOKENS))) for j in range(COLS)]
    k = int(COLS * s)
    expected = np.zeros((ROWS, COLS), dtype=bool)
    for r in range(ROWS):
        scores = [abs(Wn[r, j]) * norms[j] for j in range(COLS)]
        for j in np.argsort(scores, kind="stable")[:k]:
            expected[r, j] = True
    out = wanda.prune(W.clone(), _stats(X, "norm"), s, None)
    np.testing.assert_array_equal((out == 0).numpy(), expected)
    # kept weights untouched
    torch.testing.assert_close(out[~torch.from_numpy(expected)], W[~torch.from_numpy(expected)], rtol=0, atol=0)
    assert (out == 0).sum(1).tolist() == [k] * ROWS


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_wanda_nm_matches_brute_force(n, m):
    W, X = _layer(seed=4)
    Wn, Xn = W.double().numpy(), X.double().numpy()
    norms = np.sqrt((Xn ** 2).sum(0))
    expected = np.zeros((ROWS, COLS), dtype=bool)
    for r in range(ROWS):
        for g in range(0, COLS, m):
            group = sorted((abs(Wn[r, g + j]) * norms[g + j], j) for j in range(m))
            for _, j in group[: m - n]:
                expected[r, g + j] = True
    out = wanda.prune(W.clone(), _stats(X, "norm"), 0.0, NM(n, m))
    np.testing.assert_array_equal((out == 0).numpy(), expected)


def test_wanda_differs_from_magnitude_when_inputs_matter():
    """The input norm must enter the score: scale one input feature up hugely and it is never pruned."""
    W, X = _layer(seed=5, correlated=False)
    X[:, 0] *= 1e8
    W[:, 0] = 1e-6  # smallest magnitudes: magnitude pruning removes them
    out_w = wanda.prune(W.clone(), _stats(X, "norm"), 0.5, None)
    out_m = magnitude.prune(W.clone(), None, 0.5, None)
    assert (out_w[:, 0] != 0).all()
    assert (out_m[:, 0] == 0).all()


# ------------------------------------------------------------------ exact sparsity


@pytest.mark.parametrize("s", [0.1, 0.5, 0.63, 0.9])
def test_magnitude_exact_count_and_smallest(s):
    W, _ = _layer(seed=6)
    out = magnitude.prune(W.clone(), None, s, None)
    k = math.floor(W.numel() * s)
    assert int((out == 0).sum()) == k
    flat = np.abs(W.double().numpy().ravel())
    expected = np.zeros(flat.size, dtype=bool)
    expected[np.argsort(flat, kind="stable")[:k]] = True
    np.testing.assert_array_equal((out == 0).numpy().ravel(), expected)


@pytest.mark.parametrize("s", [0.1, 0.5, 0.63, 0.9])
def test_wanda_exact_per_row(s):
    W, X = _layer(seed=7)
    out = wanda.prune(W.clone(), _stats(X, "norm"), s, None)
    assert (out == 0).sum(1).tolist() == [math.floor(COLS * s)] * ROWS


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_sparsegpt_unstructured_exact(s):
    W, X = _layer(seed=8)
    out = sparsegpt.prune(W.clone(), _stats(X, "hessian"), s, None, blocksize=16)
    # floor(numel_block * s) per column block of 16; exact for these rates
    assert int((out == 0).sum()) == (COLS // 16) * math.floor(ROWS * 16 * s)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ N:M for all pruners


def _stats_for(method, X):
    return _stats(X, PRUNERS[method].needs)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_pattern_every_group(method, n, m):
    W, X = _layer(seed=9)
    out = PRUNERS[method].fn(W.clone(), _stats_for(method, X), 1 - n / m, NM(n, m), blocksize=32)
    zeros = (out == 0).reshape(ROWS, COLS // m, m).sum(-1)
    assert (zeros >= m - n).all(), f"{method} {n}:{m}: a group keeps more than {n}"
    if method != "sparsegpt":  # no weight update: exactly M-N per group
        assert (zeros == m - n).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_indivisible_raises(method):
    from sparsellm.errors import UsageError

    W, X = _layer(seed=9, cols=36)
    if method == "sparsegpt":
        pytest.raises(RuntimeError, PRUNERS[method].fn, W, _stats_for(method, X), 0.75, NM(2, 8))
    else:
        pytest.raises(UsageError, PRUNERS[method].fn, W, _stats_for(method, X), 0.75, NM(2, 8))


# ------------------------------------------------------------------ SparseGPT


def test_sparsegpt_zero_sparsity_unchanged():
    W, X = _layer(seed=10)
    out = sparsegpt.prune(W.clone(), _stats(X, "hessian"), 0.0, None)
    assert torch.equal(out, W)


def _recon(W, Wp, X):
    Wd, Wpd, Xd = W.double(), Wp.double(), X.double()
    return float(((Xd @ Wd.T - Xd @ Wpd.T) ** 2).sum())


@pytest.mark.parametrize("spread,blocksize,nm", [
    (1.0, 128, None),   # features of scales 0.1..10, one column block (the default size)
    (0.0, 16, None),    # equal scales, adaptive mask over several column blocks
    (1.0, 32, NM(2, 4)),
    (0.0, 16, NM(2, 4)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_wanda_and_magnitude(seed, spread, blocksize, nm):
    W, X = _layer(seed=seed, spread=spread)
    e_sgpt = _recon(W, sparsegpt.prune(W.clone(), _stats(X, "hessian"), 0.5, nm, blocksize=blocksize), X)
    e_wanda = _recon(W, wanda.prune(W.clone(), _stats(X, "norm"), 0.5, nm), X)
    e_mag = _recon(W, magnitude.prune(W.clone(), None, 0.5, nm), X)
    assert e_sgpt < 0.95 * e_wanda
    assert e_sgpt < 0.95 * e_mag
    if spread:
        assert e_wanda < e_mag  # inputs of very different scales: the norm term helps


def test_sparsegpt_dead_inputs():
    W, X = _layer(seed=11)
    X[:, 5] = 0.0
    out = sparsegpt.prune(W.clone(), _stats(X, "hessian"), 0.5, None, blocksize=16)
    assert torch.isfinite(out).all()
    assert (out[:, 5] == 0).all()


def test_inverse_cholesky_is_upper_factor_of_damped_inverse():
    _, X = _layer(seed=12, cols=24)
    H = (X.T @ X).double() * (2 / X.shape[0])
    U = sparsegpt.inverse_cholesky(H.float(), 0.01).double()
    assert torch.allclose(U, torch.triu(U))
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_inverse_cholesky_gives_up_on_negative_definite():
    with pytest.raises(UsageError, match="percdamp"):
        sparsegpt.inverse_cholesky(-torch.eye(4), 0.01)
