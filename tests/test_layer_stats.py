"""LayerStats' Hessian, accumulated as its lower triangle on the CPU and made symmetric when read,
against Σ XᵀX computed here in float64."""

from __future__ import annotations

import pytest
import torch

from sparsellm.prune import LayerStats, add_gram_, mirror_lower_


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(37, generator=g) * 4
    return [torch.randn(3, 50, 37, generator=g) * scale,  # (batch, seq, C) as a hook sees it
            torch.randn(17, 37, generator=g).t().contiguous().t(),  # non-contiguous (tokens, C)
            torch.randn(1, 9, 37, generator=g).bfloat16()]  # a bf16 model's inputs


def test_hessian_equals_xtx_and_is_symmetric():
    st = LayerStats()
    xs = _batches()
    for x in xs:
        st.add(x, "hessian")
    X = torch.cat([x.reshape(-1, 37).double() for x in xs])
    ref = X.T @ X
    H = st.hessian
    assert st.ntokens == X.shape[0] and H.dtype == torch.float32 and H.shape == (37, 37)
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(st.sq_norm.double(), (X * X).sum(0), rtol=1e-5, atol=1e-5)


def test_adding_after_a_read_and_to_a_given_full_hessian():
    """Reading symmetrizes in place; later adds (and a Hessian handed in whole, as the distributed
    reduction and tests do) still sum correctly."""
    xs = _batches(1)
    X0 = xs[0].reshape(-1, 37).double()
    st = LayerStats(ntokens=X0.shape[0], hessian=(X0.T @ X0).float())
    st.add(xs[1], "hessian")
    _ = st.hessian
    st.add(xs[2], "hessian")
    X = torch.cat([x.reshape(-1, 37).double() for x in xs])
    ref = X.T @ X
    assert torch.equal(st.hessian, st.hessian.T)
    torch.testing.assert_close(st.hessian.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("block", [4, 7, 20, 256])
def test_cpu_update_fills_the_lower_triangle_in_place(block):
    x = torch.randn(64, 20)
    H = torch.zeros(20, 20)
    ptr = H.data_ptr()
    assert add_gram_(H, x, block) is True
    assert H.data_ptr() == ptr
    torch.testing.assert_close(H.tril().double(), (x.double().T @ x.double()).tril(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,block", [(1, 4), (10, 4), (12, 4), (50, 1024)])
def test_mirror_lower(n, block):
    A = torch.randn(n, n)
    assert torch.equal(mirror_lower_(A.clone(), block), A.tril() + A.tril(-1).T)


def test_norm_need_computes_no_hessian():
    st = LayerStats()
    st.add(torch.randn(5, 8), "norm")
    assert st.hessian is None and st._hessian is None
