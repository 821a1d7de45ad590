"""Pattern parsing and the three mask selectors, against brute-force references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsellm.errors import UsageError
from sparsellm.prune.masks import NM, check_sparsity, layer_mask, nm_mask, parse_pattern, row_mask


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), ("3:8", 3, 8), (" 2 : 4 ", 2, 4)])
def test_parse_pattern(text, n, m):
    nm = parse_pattern(text)
    assert (nm.n, nm.m) == (n, m)
    assert nm.sparsity == pytest.approx(1 - n / m)
    assert str(nm) == f"{n}:{m}"


def test_parse_unstructured():
    assert parse_pattern("unstructured") is None


@pytest.mark.parametrize("bad", ["2-4", "abc", "", "2:", ":4", "2:4:8", "4:4", "5:4", "0:4", "-1:4", "2.0:4"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(UsageError):
        parse_pattern(bad)


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 0.999])
def test_check_sparsity_ok(good):
    assert check_sparsity(good) == float(good)


@pytest.mark.parametrize("bad", [1.0, 1, -0.1, 1.5, float("nan"), "0.5", None])
def test_check_sparsity_rejects(bad):
    with pytest.raises(UsageError):
        check_sparsity(bad)


def _brute_nm(score: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = score.shape
    mask = np.zeros_like(score, dtype=bool)
    for r in range(rows):
        for g in range(0, cols, m):
            group = [(score[r, g + j], j) for j in range(m)]
            for _, j in sorted(group)[: m - n]:
                mask[r, g + j] = True
    return mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2)])
def test_nm_mask_matches_brute_force(n, m):
    rng = np.random.default_rng(n * 10 + m)
    score = rng.random((6, 32)).astype(np.float32)
    mask = nm_mask(torch.from_numpy(score), NM(n, m)).numpy()
    np.testing.assert_array_equal(mask, _brute_nm(score, n, m))
    assert mask.reshape(6, -1, m).sum(-1).tolist() == [[m - n] * (32 // m)] * 6


def test_nm_mask_rejects_indivisible():
    with pytest.raises(UsageError):
        nm_mask(torch.rand(4, 36), NM(2, 8))


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_row_mask_matches_argsort(s):
    rng = np.random.default_rng(0)
    score = rng.random((5, 40)).astype(np.float32)
    mask = row_mask(torch.from_numpy(score), s).numpy()
    k = int(40 * s)
    expected = np.zeros_like(mask)
    for r in range(5):
        expected[r, np.argsort(score[r], kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum(1).tolist() == [k] * 5


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_layer_mask_matches_argsort(s):
    rng = np.random.default_rng(1)
    score = rng.random((7, 13)).astype(np.float32)
    mask = layer_mask(torch.from_numpy(score), s).numpy()
    k = int(score.size * s)
    expected = np.zeros(score.size, dtype=bool)
    expected[np.argsort(score.ravel(), kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask, expected.reshape(score.shape))
    assert mask.sum() == k


def test_row_mask_ties_are_stable():
    score = torch.ones(2, 8)
    mask = row_mask(score, 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()
