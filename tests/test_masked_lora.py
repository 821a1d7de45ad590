"""LoSA building blocks: the masked LoRA linear (merge keeps every zero and N:M group, unmerge restores the
weight, the forward equals the merged model's), ranks above 8 are real, the cubic schedule and the rank
allocation."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_model
from sparsellm.adapt import (MaskedLoraLinear, add_masked_lora, allocate_ranks, cubic_schedule, lora_layers, merge,
                             set_ranks, unmerge)
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.errors import UsageError


def _sparse_model(family, tokenizer, pattern="unstructured"):
    model = make_model(family)
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=None if pattern != "unstructured" else 0.6,
                      sparsity_type=pattern, nsamples=2, seqlen=16, diag_nsamples=0)
    prune(model, tokenizer, cfg, calib_ids=torch.randint(3, 100, (2, 16)), progress=False)
    return model


def _train_a_little(model, layers):
    """Give the adapters non-zero B so that ΔW is not trivially zero."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0, 0.05)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_merge_keeps_the_zero_set_and_unmerge_restores(family, pattern, tokenizer):
    model = _sparse_model(family, tokenizer, pattern)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = add_masked_lora(model, r=4, alpha=8, dropout=0.0)
    _train_a_little(model, layers)
    model.eval()
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        y_adapter = model(ids).logits
        merge(model)
        y_merged = model(ids).logits
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-5, rtol=1e-4)
    for m in layers:
        W = m.base.weight
        assert torch.equal(W != 0, m.mask)  # the zero set is exactly the mask's
        if pattern == "2:4":
            assert bool(((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all())
    merged = {n.replace(".base", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert sum(int((merged[n] != before[n]).sum()) for n in before) > 0  # the merge did change weights
    unmerge(model)
    for m in layers:
        W = m.base.weight
        assert bool(((W == 0) | m.mask).all())
    restored = {n.replace(".base", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for n, p in before.items():
        torch.testing.assert_close(restored[n], p, atol=1e-6, rtol=0, msg=n)


def test_masked_product_is_exactly_the_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.2] = 0.0
    m = MaskedLoraLinear(lin, r=2, alpha=4.0, dropout=0.0, r_max=5, rank=3)
    with torch.no_grad():
        m.lora_B.normal_()
    mask = (lin.weight != 0).float()
    ref = (m.lora_B[:, :3] @ m.lora_A[:3]) * mask * (4.0 / 2)  # the scaling uses r, not the active rank
    torch.testing.assert_close(m.delta(), ref)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), x @ (lin.weight + ref).T)
    # gradients reach only A and B, and only through the mask
    m(x).sum().backward()
    assert lin.weight.grad is None and m.lora_A.grad is not None and m.lora_B.grad is not None
    assert m.lora_A.grad[3:].abs().sum() == 0 and m.lora_B.grad[:, 3:].abs().sum() == 0  # inactive slice


def test_ranks_above_eight_are_real(tokenizer):
    model = _sparse_model("llama", tokenizer)
    layers = add_masked_lora(model, r=8, r_max=16, dropout=0.0)
    set_ranks(model, [16, 3])
    blocks = model.model.layers
    assert {m.rank for m in lora_layers(blocks[0])} == {16} and {m.rank for m in lora_layers(blocks[1])} == {3}
    m = lora_layers(blocks[0])[0]
    with torch.no_grad():
        m.lora_B.zero_()
        m.lora_B[:, 12] = 1.0  # only the 13th rank component is non-zero: it must contribute at rank 16
    assert m.delta().abs().sum() > 0
    m.set_rank(8)
    assert m.delta().abs().sum() == 0
    with pytest.raises(UsageError):
        set_ranks(model, [17, 1])
    with pytest.raises(UsageError):
        set_ranks(model, [0, 1])
    with pytest.raises(UsageError):
        set_ranks(model, [4])
    assert len(layers) == 2 * 7


def test_fresh_adapter_changes_nothing(tokenizer):
    model = _sparse_model("qwen2", tokenizer)
    ids = torch.randint(3, 100, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        add_masked_lora(model, dropout=0.0)
        torch.testing.assert_close(model(ids).logits, ref)


def test_cubic_schedule():
    assert cubic_schedule(0.7, 5) == pytest.approx([0.7 - 0.7 * (1 - t / 5) ** 3 for t in range(1, 6)])
    assert [round(s, 3) for s in cubic_schedule(0.7, 5)] == [0.342, 0.549, 0.655, 0.694, 0.7]
    with pytest.raises(UsageError):
        cubic_schedule(0.7, 0)


@pytest.mark.parametrize("errors,mean,want", [
    ([1.0, 1.0, 1.0, 1.0], 6, [6, 6, 6, 6]),
    ([0.0, 0.0, 0.0], 4, [4, 4, 4]),
    ([1.0, 2.0, 3.0, 10.0], 6, None),
    ([0.0, 0.0, 0.0, 100.0], 8, None),
])
def test_allocate_ranks(errors, mean, want):
    r = allocate_ranks(errors, mean, r_max=16)
    assert sum(r) == round(mean * len(errors)) and all(1 <= x <= 16 for x in r)
    if want is not None:
        assert r == want
    else:  # more error, no fewer ranks
        order = sorted(range(len(errors)), key=lambda i: errors[i])
        assert all(r[order[k]] <= r[order[k + 1]] for k in range(len(r) - 1))
    with pytest.raises(UsageError):
        allocate_ranks(errors, 17, r_max=16)


def test_bf16_merge_and_unmerge_are_fp32_sums_cast_once():
    """A bf16 merge is W ← bf16(fp32(W) + (α/r)·(fp32(B) @ fp32(A)) ⊙ M), bit for bit: one rounding, not a bf16
    product, a bf16 scaling and a bf16 add; unmerge likewise subtracts in fp32 and casts once."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.05] = 0.0
    m = MaskedLoraLinear(lin, r=4, alpha=8.0, dropout=0.0, r_max=6, rank=5)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
    W0 = lin.weight.detach().clone()
    mask = (W0 != 0).float()
    A, B = m.lora_A.detach()[:5].float(), m.lora_B.detach()[:, :5].float()
    delta = (B @ A) * mask * (8.0 / 4)  # reference: fp32 product and scaling, the configured r
    m.merge()
    want = (W0.float() + delta).to(torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.weight, want)
    merged = lin.weight.detach().clone()
    m.unmerge()
    assert torch.equal(lin.weight, ((merged.float() - delta) * mask).to(torch.bfloat16))
    assert bool((lin.weight[mask == 0] == 0).all())
