"""SparseGPT (`sparsellm.prune.sparsegpt.prune`) against an independent, deliberately naive float64
implementation of Algorithm 1 of Frantar & Alistarh (ICML 2023) written here.

The reference works column by column with the textbook OBS formulas on a *dense* inverse Hessian and no
Cholesky factor at all:

    for j = 0 .. C_in−1:
        (at the start of a mask block: choose the block's mask, see below)
        q_j   = w_j with the masked rows zeroed
        e     = (w_j − q_j) / [H⁻¹]_jj
        w_k  ← w_k − e · [H⁻¹]_jk            for every later column k > j
        H⁻¹  ← H⁻¹ − H⁻¹[:, j] H⁻¹[j, :] / [H⁻¹]_jj        (Gaussian elimination of column j)

After the elimination of columns 0..j−1, the dense matrix above is (on indices j..) exactly
((H + λI)[j:, j:])⁻¹, the inverse Hessian of the weights not yet fixed, which is what OBS needs for
column j.

Equivalence with the library's Cholesky formulation. Let U be the upper Cholesky factor of (H + λI)⁻¹,
so (H + λI)⁻¹ = UᵀU. Eliminating one column of a symmetric positive-definite matrix A = H⁻¹ with
Gaussian elimination is A ← A − a aᵀ / a_jj, and the row j of the Cholesky factor of A is
U[j, j:] = A[j, j:] / √A_jj; the remainder A − a aᵀ/a_jj is exactly what the Cholesky algorithm factors
next. Hence, with H⁻¹_(j) the dense inverse after eliminating columns 0..j−1:

    U_jj² = [H⁻¹_(j)]_jj = [((H + λI)[j:, j:])⁻¹]_00 ,      U_jk / U_jj = [H⁻¹_(j)]_jk / [H⁻¹_(j)]_jj.

So the library's update err = (w_j − q_j)/U_jj spread with U[j, k] equals the reference's
(w_j − q_j)/[H⁻¹_(j)]_jj · [H⁻¹_(j)]_jk, and its score w²/U_jj² (Algorithm 1's "w²/[H⁻¹]_cc²", where
H⁻¹ there denotes the Cholesky factor) is the OBS saliency w_j² / [H⁻¹_(j)]_jj, with the diagonal each
column *will have when its turn comes*. The reference computes that diagonal by running the elimination
ahead on a copy of its dense inverse (`_lookahead_diag`); `test_cholesky_diagonal_equivalence` checks the
identities above numerically.

Mask blocks: unstructured, the floor(numel · sparsity) lowest scores of each block of `blocksize`
columns (the last block may be narrower), chosen at the block's start from the weights as updated so far;
N:M, the M−N lowest scores per row in every group of M columns, chosen at the group's start (Algorithm 1
with B_s = M). For N:M the library's lazy-batch size is therefore irrelevant to the result, which the
tests check with block sizes that are and are not multiples of M.

Precision: `prune` converts its input to float32 (`weight.clone().float()`, `hessian.float()`), so it
cannot run in float64; weights are compared to 1e-5 of the largest weight (float32 round-off through
the Cholesky factors and updates: at most ~3e-7 measured on these cases). Masks are compared exactly;
every case first checks that the reference's decisions are not near-ties (relative score gap ≥ 1e-4 at
each cut, ~100x float32's effect on the scores), so round-off cannot legitimately flip them.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsellm.prune import LayerStats, sparsegpt
from sparsellm.prune.masks import NM

F64 = torch.float64
MIN_GAP = 1e-4  # smallest relative gap between the last pruned and the first kept score


def _data(rows, cols, tokens=96, seed=0, dead=(), mix=0.0):
    """W (rows, cols) and X (tokens, cols), float64: Gaussian inputs of different scales, a few columns
    strongly correlated with others, optionally all columns mixed (X ← X (I + mix·A/√cols), A Gaussian),
    optionally dead (all-zero) columns."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    X = torch.randn(tokens, cols, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, cols, dtype=F64)
    X[:, 3] = 0.9 * X[:, 1] + 0.3 * torch.randn(tokens, generator=g, dtype=F64)
    X[:, cols - 2] = 0.7 * X[:, 0] - 0.6 * X[:, 5] + 0.2 * torch.randn(tokens, generator=g, dtype=F64)
    X[:, 7] = X[:, 7] + 0.8 * X[:, 2]
    if mix:
        X = X @ (torch.eye(cols, dtype=F64) + mix * torch.randn(cols, cols, generator=g, dtype=F64) / math.sqrt(cols))
    for j in dead:
        X[:, j] = 0.0
    return W, X


def _lookahead_diag(Hinv, start, stop):
    """[H⁻¹]_cc for c in start..stop−1 as each will be when column c is processed: eliminate the columns
    start..c−1 from a copy of the current dense inverse."""
    A = Hinv.clone()
    d = []
    for c in range(start, stop):
        d.append(A[c, c].item())
        A -= torch.outer(A[:, c], A[c, :]) / A[c, c]
    return torch.tensor(d, dtype=F64)


def _cut(scores, k):
    """Indices of the k lowest of a 1-D tensor, and the relative gap between the k-th and (k+1)-th."""
    order = torch.sort(scores).indices
    gap = math.inf
    if 0 < k < scores.numel():
        lo, hi = scores[order[k - 1]].item(), scores[order[k]].item()
        gap = (hi - lo) / max(hi, 1e-300)
    return order[:k], gap


def _cut_free(scores, k, forced):
    """Mask (True = pruned) of a 1-D score vector: every `forced` entry, plus the k − #forced lowest of the
    others (none when #forced ≥ k); and the relative gap at that cut among the others."""
    free = torch.nonzero(~forced).flatten()
    idx, gap = _cut(scores[free], max(k - int(forced.sum()), 0))
    out = forced.clone()
    out[free[idx]] = True
    return out, gap


def reference(W, X, sparsity, nm, blocksize, percdamp=0.01, keep=None):
    """Naive SparseGPT in float64. Returns (pruned W, mask (True = pruned), smallest decision gap).
    keep: the input's zeros of an already sparse weight (bool, W's shape), treated as already pruned:
    each is in the mask of its block (N:M group) and counts towards its floor(numel · sparsity) (M − N)."""
    W = W.to(F64).clone()
    keep = torch.zeros(W.shape, dtype=torch.bool) if keep is None else keep
    rows, cols = W.shape
    H = 2.0 / X.shape[0] * (X.T.to(F64) @ X.to(F64))
    for j in range(cols):
        if H[j, j] == 0:  # dead input
            H[j, j] = 1.0
            W[:, j] = 0.0
    H = H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=F64)
    Hinv = torch.linalg.inv(H)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    width = nm.m if nm else blocksize
    gap = math.inf
    for j in range(cols):
        if j % width == 0:  # a new mask block: choose its mask from the weights as they are now
            stop = min(j + width, cols)
            d = _lookahead_diag(Hinv, j, stop)
            score = W[:, j:stop] ** 2 / d
            if nm is None:
                k = math.floor(score.numel() * sparsity)
                block, g = _cut_free(score.flatten(), k, keep[:, j:stop].flatten())
                mask[:, j:stop] = block.reshape(score.shape)
                gap = min(gap, g)
            else:
                for r in range(rows):
                    mask[r, j:stop], g = _cut_free(score[r], nm.m - nm.n, keep[r, j:stop])
                    gap = min(gap, g)
        q = torch.where(mask[:, j], 0.0, W[:, j])
        e = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(e, Hinv[j, j + 1:])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, mask, gap


def _library(W, X, sparsity, nm, blocksize):
    st = LayerStats(ntokens=X.shape[0], hessian=(X.T @ X).float())
    return sparsegpt.prune(W.float().clone(), st, sparsity, nm, blocksize=blocksize, percdamp=0.01).to(F64)


def _compare(W, X, sparsity, nm, blocksize):
    ref, mask, gap = reference(W, X, sparsity, nm, blocksize)
    assert gap >= MIN_GAP, f"test data has a near-tie (gap {gap:.2e}); pick another seed"
    out = _library(W, X, sparsity, nm, blocksize)
    assert torch.equal(ref == 0, mask | (W == 0) | (X == 0).all(0)), "reference: zeros are exactly the mask"
    assert torch.equal(out == 0, ref == 0), (
        f"masks differ in {int(((out == 0) != (ref == 0)).sum())} entries")
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * scale)
    return ref, mask


CASES_UNSTRUCTURED = [
    # rows, cols, sparsity, blocksize
    (8, 16, 0.5, 128),  # one block wider than the layer
    (8, 16, 0.5, 16),   # exactly one block
    (8, 16, 0.5, 4),    # four blocks
    (6, 20, 0.3, 8),    # 8 + 8 + 4: block size not dividing C_in
    (10, 24, 0.7, 5),   # 5 blocks of 5 and one of 4
    (12, 18, 0.6, 7),
    (9, 22, 0.2, 3),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rows,cols,sparsity,blocksize", CASES_UNSTRUCTURED)
def test_unstructured_matches_reference(rows, cols, sparsity, blocksize, seed):
    W, X = _data(rows, cols, seed=seed)
    ref, mask = _compare(W, X, sparsity, None, blocksize)
    for i in range(0, cols, blocksize):  # floor(numel · s) per block
        blk = mask[:, i:i + blocksize]
        assert int(blk.sum()) == math.floor(blk.numel() * sparsity)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (2, 4, 8), (2, 4, 6), (4, 8, 8), (4, 8, 12), (4, 8, 128)])
def test_nm_matches_reference(n, m, blocksize, seed):
    W, X = _data(8, 24, seed=seed + 11)
    ref, mask = _compare(W, X, 1 - n / m, NM(n, m), blocksize)
    assert (mask.reshape(8, 24 // m, m).sum(-1) == m - n).all()


@pytest.mark.parametrize("nm,blocksize", [(None, 8), (None, 128), (NM(2, 4), 8)])
def test_dead_input_matches_reference(nm, blocksize):
    W, X = _data(8, 20, seed=3, dead=(6,))
    ref, _ = _compare(W, X, 0.5, nm, blocksize)
    assert (ref[:, 6] == 0).all()


@pytest.mark.parametrize("sparsity,nm,blocksize", [(0.5, None, 128), (0.5, None, 4), (0.7, None, 6), (0.5, NM(2, 4), 128)])
def test_reference_reconstructs_better_than_masking(sparsity, nm, blocksize):
    """The optimal update is what distinguishes SparseGPT from masking: zeroing the same mask without the
    update leaves a larger output error ‖(W − Ŵ) Xᵀ‖. (Not a theorem for the greedy column order: with
    very strongly mixed inputs the update can lose to plain masking, so the inputs here are moderately
    correlated.)"""
    W, X = _data(10, 24, seed=1, mix=1.0)
    ref, mask, _ = reference(W, X, sparsity, nm, blocksize)
    masked = W.masked_fill(mask, 0.0)
    err_ref = torch.linalg.norm((W - ref) @ X.T)
    err_mask = torch.linalg.norm((W - masked) @ X.T)
    assert err_ref < 0.95 * err_mask
    out = _library(W, X, sparsity, nm, blocksize)
    assert torch.linalg.norm((W - out) @ X.T) < 0.95 * err_mask


def test_cholesky_diagonal_equivalence():
    """The identities of the module docstring: the lookahead diagonal of the eliminated dense inverse is
    [((H + λI)[j:, j:])⁻¹]_00 and the squared diagonal of the upper Cholesky factor of (H + λI)⁻¹, and
    the eliminated rows are the Cholesky rows scaled by U_jj."""
    _, X = _data(4, 16, seed=7)
    H = 2.0 / X.shape[0] * X.T @ X
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(16, dtype=F64)
    Hinv = torch.linalg.inv(H)
    d = _lookahead_diag(Hinv, 0, 16)
    U = torch.linalg.cholesky(Hinv, upper=True)
    torch.testing.assert_close(d, torch.diag(U) ** 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(d, torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(16)]),
                               rtol=1e-10, atol=0)
    A = Hinv.clone()
    for j in range(16):
        torch.testing.assert_close(A[j, j:] / A[j, j].sqrt(), U[j, j:], rtol=1e-9, atol=1e-12)
        A -= torch.outer(A[:, j], A[j, :]) / A[j, j]


# ------------------------------------------------------------------ already sparse inputs (pruning again)
#
# A model pruned before keeps its zeros: the reference above with `keep` = the input's zeros. Pruning again
# with C_in wider than the block size used to refill them (the OBS update of earlier blocks reaches columns
# whose mask is chosen later, and the new mask did not have to contain the old zeros).


def _pruned_before(W, X, sparsity, seed_blocksize=4):
    """W as a model pruned before holds it: the reference's result at `sparsity`, rounded to float32."""
    return reference(W, X, sparsity, None, seed_blocksize)[0].float().to(F64)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("first,second,nm,blocksize", [
    (0.5, 0.7, None, 8),        # three blocks: C_in 24 > block size
    (0.5, 0.7, None, 5),        # blocks that do not line up with the first prune's
    (0.3, 0.6, None, 128),      # one block: the updates stay inside it
    (0.6, 0.4, None, 8),        # a lower target: only the existing zeros are pruned, all of them
    (0.4, None, NM(2, 4), 8),   # N:M on top of unstructured zeros (some groups hold more than M − N)
    (0.2, None, NM(4, 8), 12),
])
def test_pruning_a_sparse_weight_again_keeps_its_zeros(first, second, nm, blocksize, seed):
    W, X = _data(10, 24, seed=seed + 20, mix=1.0)  # correlated inputs: large OBS updates
    W0 = _pruned_before(W, X, first)
    keep = W0 == 0
    assert keep.double().mean() >= first - 0.05
    sparsity = 1 - nm.n / nm.m if nm else second
    ref, mask, gap = reference(W0, X, sparsity, nm, blocksize, keep=keep)
    assert gap >= MIN_GAP, f"test data has a near-tie (gap {gap:.2e}); pick another seed"
    out = _library(W0, X, sparsity, nm, blocksize)
    assert (out[keep] == 0).all(), f"{int((out[keep] != 0).sum())} zeros of the input were refilled"
    assert torch.equal(out == 0, ref == 0), f"masks differ in {int(((out == 0) != (ref == 0)).sum())} entries"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    if nm is None:  # each block: max(its existing zeros, floor(numel · s)) zeros
        for i in range(0, 24, blocksize):
            blk, z = mask[:, i:i + blocksize], keep[:, i:i + blocksize]
            assert int(blk.sum()) == max(int(z.sum()), math.floor(blk.numel() * second))
    else:
        assert ((~mask).reshape(10, 24 // nm.m, nm.m).sum(-1) <= nm.n).all()


def _sparsegpt_44ce298(weight, stats, sparsity, nm, blocksize=128, percdamp=0.01):
    """`sparsegpt.prune` as it was at commit 44ce298, before already sparse inputs kept their zeros
    (verbatim, with `inverse_cholesky`'s first, successful try inlined)."""
    W = weight.clone().float()
    rows, cols = W.shape
    if sparsity == 0 and nm is None:
        return W
    H = stats.hessian.to(W.device).float() * (2.0 / max(stats.ntokens, 1))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp * torch.diag(H).mean().clamp_min(1e-8)
    L, info = torch.linalg.cholesky_ex(H + damp * eye)
    assert info == 0
    Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    assert info == 0
    if nm:
        blocksize = max(nm.m, blocksize - blocksize % nm.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            k = int(W1.numel() * sparsity)
            if k:
                score = (W1 ** 2 / d.reshape(1, -1) ** 2).flatten()
                mask1.view(-1)[torch.topk(score, k, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm and i % nm.m == 0:
                score = W1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].reshape(1, -1) ** 2
                idx = torch.topk(score, nm.m - nm.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("zeros", [0, 5])  # 5 of 64·96: 0.08%, incidental zeros of a dense model (< 1%)
@pytest.mark.parametrize("sparsity,nm,blocksize", [(0.5, None, 128), (0.5, None, 32), (0.7, None, 40),
                                                   (0.6, None, 7), (0.5, NM(2, 4), 32), (0.5, NM(4, 8), 128)])
def test_dense_input_is_byte_identical_to_44ce298(sparsity, nm, blocksize, zeros):
    """Pruning a dense weight gives exactly the bytes it gave before (BENCHMARKS.md §1 depends on it),
    also with a few exact zeros as a de-quantized dense model has (SmolLM2-135M: 0.03%)."""
    W, X = _data(64, 96, tokens=200, seed=5, dead=(17,))
    W = W.float()
    W.view(-1)[torch.randperm(W.numel(), generator=torch.Generator().manual_seed(1))[:zeros]] = 0.0
    st = LayerStats(ntokens=X.shape[0], hessian=(X.T @ X).float())
    out = sparsegpt.prune(W.clone(), st, sparsity, nm, blocksize=blocksize, percdamp=0.01)
    assert torch.equal(out, _sparsegpt_44ce298(W.clone(), st, sparsity, nm, blocksize=blocksize))


def test_the_data_above_exercises_the_refill():
    """The algorithm of 44ce298 refilled zeros on the data of the re-pruning test (so that test can fail):
    unstructured with C_in wider than the block size, and N:M."""
    for nm, sparsity in ((None, 0.7), (NM(2, 4), 0.5)):
        W, X = _data(10, 24, seed=20, mix=1.0)
        W0 = _pruned_before(W, X, 0.4 if nm else 0.5)
        st = LayerStats(ntokens=X.shape[0], hessian=(X.T @ X).float())
        old = _sparsegpt_44ce298(W0.float(), st, sparsity, nm, blocksize=8)
        assert (old[W0 == 0] != 0).any()
