"""LoSA's reference block outputs come from the engine's block loop (`engine.block_outputs`): they equal the
outputs of every decoder block in a plain forward of the HF model, taken with forward hooks and with
`output_hidden_states=True` (whose last entry is after the final norm, so it checks every block but the last)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_model
from sparsellm.adapt.losa import dense_outputs
from sparsellm.engine import block_outputs
from sparsellm.models import get_blocks


def _reference(model, ids):
    """Block outputs of one plain forward: from hooks on every block, and HF's hidden states."""
    got = {}

    def hook(i):
        def fn(module, args, out):
            got[i] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(get_blocks(model))]
    try:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(got))], hidden


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [None, 2])
def test_dense_outputs_equal_the_models_block_outputs(family, batch_size):
    model = make_model(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 16))
    hooked, hidden = _reference(model, ids)
    outs = dense_outputs(model, ids, batch_size)
    L = len(get_blocks(model))
    assert len(outs) == L == len(hidden) - 1
    for i in range(L):
        torch.testing.assert_close(outs[i], hooked[i], atol=1e-5, rtol=1e-5, msg=f"block {i}")
        if i < L - 1:
            torch.testing.assert_close(outs[i], hidden[i + 1], atol=1e-5, rtol=1e-5, msg=f"block {i}")
    assert not torch.equal(outs[0], outs[1])  # distinct copies, not one reused buffer


def test_block_outputs_yields_each_block_once_in_order():
    model = make_model("gemma3")
    ids = torch.randint(3, 100, (2, 8))
    assert [i for i, _ in block_outputs(model, ids, progress=False)] == list(range(len(get_blocks(model))))
