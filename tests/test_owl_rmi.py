"""OWL (outlier ratios → rates) and LoSA's RMI (streamed Grams → CKA → LP rates), against reference
computations written out here in numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sparsellm.allocate import owl, rmi
from sparsellm.errors import UsageError

# ---------------------------------------------------------------- OWL

def _lod_reference(arrays, m):
    a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in arrays])
    return 100.0 * np.mean(a > m * a.mean())


@pytest.mark.parametrize("m", [5.0, 7.0])
def test_outlier_ratio_matches_numpy_and_list_equals_concatenation(m):
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(64, 48, generator=g), torch.rand(200, generator=g), torch.rand(3, 5, 7, generator=g)]
    for p in parts:  # plant outliers: a few entries at 20x and 100x the typical value
        idx = torch.randperm(p.numel(), generator=g)[:p.numel() // 50]
        p.view(-1)[idx] *= torch.where(torch.rand(len(idx), generator=g) < 0.5, 20.0, 100.0)
    ref = _lod_reference([p.numpy() for p in parts], m)
    assert 0 < ref < 5
    assert owl.outlier_ratio(parts, m) == pytest.approx(ref, abs=1e-12)
    assert owl.outlier_ratio(torch.cat([p.reshape(-1) for p in parts]), m) == pytest.approx(ref, abs=1e-12)
    # a single tensor on its own
    assert owl.outlier_ratio(parts[1], m) == pytest.approx(_lod_reference([parts[1].numpy()], m), abs=1e-12)


def test_outlier_ratio_threshold_is_exactly_m_times_the_mean():
    g = torch.Generator().manual_seed(4)
    parts = [torch.rand(300, generator=g), torch.rand(20, 10, generator=g)]
    a = np.concatenate([p.double().numpy().ravel() for p in parts])
    fifth = np.sort(a)[-5]
    for eps, count in ((-1e-9, 5), (1e-9, 4)):  # m puts the threshold just below / above the 5th largest
        m = fifth / a.mean() * (1 + eps)
        assert _lod_reference([a], m) == pytest.approx(100 * count / a.size)
        assert owl.outlier_ratio(parts, m) == pytest.approx(100 * count / a.size, abs=1e-12)


def test_outlier_ratio_half_precision_over_several_chunks():
    g = torch.Generator().manual_seed(1)
    a = torch.rand((1 << 22) + 4099, generator=g).half()
    a[-7:] = 60.0  # outliers in the last, partial chunk
    a[:5] = 60.0
    ref = _lod_reference([a.float().numpy()], 5.0)
    assert ref == pytest.approx(100 * 12 / a.numel())
    assert owl.outlier_ratio([a], 5.0) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(UsageError, match="empty"):
        owl.outlier_ratio([torch.empty(0)])


def _owl_code(lod, S, lam):
    """OWL's released code: density = norm·2λ − mean(norm·2λ) + 1 − S; sparsity = 1 − density."""
    lod = np.asarray(lod, dtype=np.float64)
    d = (lod - lod.min()) * (1 / (lod.max() - lod.min()) * lam * 2)
    return 1 - (d - d.mean() + (1 - S))


@pytest.mark.parametrize("S,lam", [(0.5, 0.08), (0.7, 0.08), (0.8, 0.02), (0.3, 0.3), (0.9, 0.099)])
def test_owl_rates_bounded_mean_and_monotone(S, lam):
    rng = np.random.default_rng(int(S * 100))
    for L in (3, 8, 32, 80):
        lod = rng.gamma(2.0, 2.0, size=L) ** 2  # skewed, so clipping is active
        r = np.array(owl.allocate(L, S, owl_lod=lod.tolist(), owl_lambda=lam))
        assert r.min() >= S - lam - 1e-15 and r.max() <= S + lam + 1e-15
        assert abs(r.mean() - S) < 1e-12
        order = np.argsort(lod)
        assert np.all(np.diff(r[order]) <= 1e-15)  # more outliers ⇒ sparsity not higher
        assert r[np.argmin(lod)] > r[np.argmax(lod)]


def test_owl_matches_reference_formula_when_inside_bounds():
    S, lam = 0.7, 0.08
    for norm in ([0.0, 1.0, 0.2, 0.35, 0.95], [0.0, 0.3, 0.7, 1.0, 0.45, 0.55]):  # mean(norm) = 0.5
        lod = 3.0 + 11.0 * np.array(norm)
        ref = _owl_code(lod, S, lam)
        assert ref.min() >= S - lam - 1e-12 and ref.max() <= S + lam + 1e-12
        assert owl.rates_from_lod(lod, S, lam) == pytest.approx(ref.tolist(), abs=1e-14)


def test_owl_skewed_lod_is_clipped_where_the_reference_formula_is_not():
    S, lam = 0.7, 0.08
    lod = [2.0, 2.0, 2.0, 2.0, 9.0]
    assert _owl_code(lod, S, lam)[-1] == pytest.approx(S - 1.6 * lam)  # the code leaves [S − λ, S + λ]
    # ours: four at S + λ + c, one at S − λ, mean S ⇒ c = −0.75λ
    assert owl.rates_from_lod(lod, S, lam) == pytest.approx([S + 0.25 * lam] * 4 + [S - lam], abs=1e-14)


def test_owl_degenerate_inputs_give_target():
    S = 0.6
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        assert owl.rates_from_lod([4.2] * 7, S) == [S] * 7
        assert owl.allocate(1, S, owl_lod=[3.0]) == [S]
        assert owl.allocate(2, S, owl_lod=[3.0, 3.0]) == [S, S]
        assert owl.allocate(4, S, owl_lod=[1.0, 5.0, 2.0, 3.0], owl_lambda=0.0) == [S] * 4
        assert owl.rates_from_lod([], S) == []
    # two different blocks: the full range, fewer outliers ⇒ S + λ
    assert owl.allocate(2, S, owl_lod=[1.0, 5.0]) == pytest.approx([S + 0.08, S - 0.08], abs=1e-15)


def test_owl_weighted_mean_with_unequal_weights():
    rng = np.random.default_rng(3)
    S, lam, L = 0.7, 0.1, 24
    lod, w = rng.exponential(size=L) ** 2, rng.integers(1, 50, size=L).astype(float) * 1e6
    r = np.array(owl.rates_from_lod(lod, S, lam, weights=w))
    assert abs((r * w).sum() / w.sum() - S) < 1e-12
    assert abs(r.mean() - S) > 1e-4  # the weighting matters
    assert r.min() >= S - lam - 1e-15 and r.max() <= S + lam + 1e-15
    # independent solve: bisection on the common shift c of raw = S + λ − 2λ·norm
    norm = (lod - lod.min()) / (lod.max() - lod.min())
    raw = S + lam - 2 * lam * norm
    lo, hi = -2 * lam, 2 * lam
    for _ in range(200):
        c = (lo + hi) / 2
        if (np.clip(raw + c, S - lam, S + lam) * w).sum() / w.sum() < S:
            lo = c
        else:
            hi = c
    assert r == pytest.approx(np.clip(raw + (lo + hi) / 2, S - lam, S + lam), abs=1e-12)


@pytest.mark.parametrize("S,lam,match", [(0.05, 0.08, "min"), (0.95, 0.05, "strictly"), (0.5, 0.5, "strictly"),
                                         (0.5, -0.01, "0 <= λ")])
def test_owl_lambda_errors(S, lam, match):
    with pytest.raises(UsageError, match=match):
        owl.check_lambda(S, lam)
    with pytest.raises(UsageError, match="outside the allowed range"):
        owl.allocate(3, S, owl_lod=[1.0, 2.0, 3.0], owl_lambda=lam)
    owl.check_lambda(0.5, 0.49)
    owl.check_lambda(0.2, 0.2)


def test_owl_missing_or_bad_lod():
    with pytest.raises(UsageError, match=r"outlier ratios; use sparsellm.prune \(the whole-model run\)"):
        owl.allocate(4, 0.5)
    with pytest.raises(UsageError, match="3 outlier ratios for 4"):
        owl.allocate(4, 0.5, owl_lod=[1.0, 2.0, 3.0])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="finite"):
            owl.allocate(3, 0.5, owl_lod=[1.0, bad, 3.0])
    with pytest.raises(UsageError, match="weights"):
        owl.rates_from_lod([1.0, 2.0], 0.5, weights=[1.0])


# ---------------------------------------------------------------- RMI

def test_gram_equals_direct_float64_product():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 10, 8, generator=g)
    F = X.reshape(6, -1).double()
    for chunk in (3, 4, 10, 256):
        K = rmi.gram(X, chunk=chunk)
        assert K.dtype == torch.float64 and K.shape == (6, 6)
        assert torch.allclose(K, F @ F.T, rtol=1e-12, atol=1e-12)
    Xb = (X * 30).bfloat16()  # products are accumulated in float64, not in bf16
    Fb = Xb.reshape(6, -1).double()
    assert torch.allclose(rmi.gram(Xb, chunk=3), Fb @ Fb.T, rtol=1e-12, atol=1e-9)


def _cka_reference(feats):
    """Linear CKA from full features, centring with H = I − 11ᵀ/n."""
    ks = []
    for X in feats:
        F = X.reshape(X.shape[0], -1).double().numpy()
        H = np.eye(len(F)) - 1.0 / len(F)
        ks.append(H @ F @ F.T @ H)
    L = len(ks)
    out = np.zeros((L, L))
    for i in range(L):
        for j in range(L):
            den = np.linalg.norm(ks[i]) * np.linalg.norm(ks[j])
            out[i, j] = (ks[i] * ks[j]).sum() / den if den > 0 else 0.0
    return out


def test_gram_stream_cka_matches_direct_cka():
    g = torch.Generator().manual_seed(1)
    n = 7
    X0 = torch.randn(n, 9, 5, generator=g)
    feats = [X0, 3.7 * X0, torch.randn(n, 9, 5, generator=g), X0 + 0.5 * torch.randn(n, 9, 5, generator=g),
             torch.randn(n, 9, 5, generator=g).abs() ** 2]
    stream = rmi.GramStream(chunk=4)
    for X in feats:
        stream.add(X)
    assert len(stream) == 5 and all(k.shape == (n, n) for k in stream.grams)
    cka = stream.cka()
    assert cka == pytest.approx(_cka_reference(feats), abs=1e-10)
    assert np.array_equal(cka, cka.T) and np.allclose(np.diag(cka), 1.0, atol=1e-15)
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-12) and cka[0, 2] < 0.9


def test_gram_stream_zero_gram_and_sample_mismatch():
    g = torch.Generator().manual_seed(2)
    same = torch.randn(1, 6, 4, generator=g).expand(5, 6, 4)  # every sample alike ⇒ centred Gram 0
    stream = rmi.GramStream()
    for X in (torch.randn(5, 6, 4, generator=g), same, torch.zeros(5, 6, 4), torch.randn(5, 6, 4, generator=g)):
        stream.add(X)
    with np.errstate(all="raise"):
        cka = stream.cka()
    assert np.isfinite(cka).all()
    assert np.all(cka[1] == 0) and np.all(cka[:, 2] == 0) and cka[0, 0] == 1 and cka[3, 3] == 1
    with pytest.raises(UsageError, match="samples"):
        stream.add(torch.randn(4, 6, 4))


@pytest.mark.parametrize("S,delta", [(0.3, 0.01), (0.5, 0.01), (0.55, 0.02), (0.6, 0.02), (0.65, 0.03),
                                     (0.7, 0.03), (0.8, 0.03), (0.95, 0.025), (0.99, 0.005), (0.02, 0.01),
                                     (0.01, 0.005), (0.0, 0.0)])
def test_delta_for(S, delta):
    assert rmi.delta_for(S) == pytest.approx(delta, abs=1e-15)


@pytest.mark.parametrize("S,delta", [(0.3, 0.01), (0.5, 0.01), (0.7, 0.03), (0.8, 0.03), (0.95, 0.025)])
@pytest.mark.parametrize("L", [7, 8, 32])
@pytest.mark.parametrize("beta", [1.0, 100.0])
def test_rmi_lp_is_bang_bang_on_redundancy_order(S, delta, L, beta):
    rng = np.random.default_rng(L)
    A = rng.uniform(0, 1, size=(L, L))
    cka = (A + A.T) / 2
    np.fill_diagonal(cka, 1.0)
    x = np.array(rmi.rates_from_cka(cka, S, rmi_beta=beta))
    assert abs(x.mean() - S) < 1e-12
    assert x.min() >= S - delta - 1e-12 and x.max() <= S + delta + 1e-12
    red = cka.sum(1) - 1.0
    order = np.argsort(-red)  # most redundant first
    half = L // 2
    assert x[order[:half]] == pytest.approx([S + delta] * half, abs=1e-9)
    assert x[order[L - half:]] == pytest.approx([S - delta] * half, abs=1e-9)
    if L % 2:
        assert x[order[half]] == pytest.approx(S, abs=1e-9)


def test_rmi_end_to_end_and_degenerate():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, 4, generator=g)
    stream = rmi.GramStream()
    for k in range(6):  # blocks 0..2 are near-copies (redundant), 3..5 independent
        stream.add(base + 0.05 * torch.randn(8, 6, 4, generator=g) if k < 3 else torch.randn(8, 6, 4, generator=g))
    r = rmi.allocate(6, 0.5, rmi_cka=stream.cka())
    assert r[:3] == pytest.approx([0.51] * 3) and r[3:] == pytest.approx([0.49] * 3)
    assert rmi.rates_from_cka(np.eye(5), 0.6) == [0.6] * 5
    assert rmi.rates_from_cka(np.ones((4, 4)), 0.6) == [0.6] * 4  # all equally redundant
    assert rmi.allocate(1, 0.7, rmi_cka=[[1.0]]) == [0.7]
    assert rmi.rates_from_cka(stream.cka(), 0.6, rmi_delta=0.0) == [0.6] * 6


@pytest.mark.parametrize("kw,match", [({"rmi_delta": -0.01}, "δ"), ({"rmi_delta": 0.31}, "δ"),
                                      ({"rmi_delta": 0.71}, "δ"), ({"rmi_beta": 0.0}, "β"),
                                      ({"rmi_beta": float("nan")}, "β")])
def test_rmi_bad_parameters(kw, match):
    cka = np.eye(4) + 0.1
    with pytest.raises(UsageError, match=match):
        rmi.rates_from_cka(cka, 0.7, **kw)


def test_rmi_missing_or_bad_cka():
    with pytest.raises(UsageError, match="CKA matrix of the block inputs"):
        rmi.allocate(4, 0.5)
    with pytest.raises(UsageError, match="4 blocks"):
        rmi.allocate(4, 0.5, rmi_cka=np.eye(3))
    with pytest.raises(UsageError, match="square"):
        rmi.rates_from_cka(np.ones((3, 4)), 0.5)
    with pytest.raises(UsageError, match="finite"):
        rmi.rates_from_cka(np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.5)
