"""Perplexity block by block, for a model larger than the device or than memory.

    X = block-0 inputs of every window (engine.capture_inputs: only the embeddings run, on the device)
    for block i: onloader(model).block(i) ─► Y = block(X) per micro-batch ─► release(i) ─► swap X, Y
    per micro-batch of X: final norm (OPT: and project_out) ─► output head ─► logits ─► NLL of each window

Every window goes through block i before any goes through block i + 1, so each block is read (a lazy
model) or moved (an in-memory model with an onloader on another device) once per evaluation, and at most
one block is materialised at a time. The activations are two buffers of shape (windows, seqlen, hidden)
that are swapped, on the device when they fit and in pinned CPU memory otherwise (`engine.capture_inputs`);
the logits exist for one micro-batch at a time. The windows and the loss are those of `perplexity`'s
ordinary path (the Wanda/SparseGPT protocol); only the order of the work changes.
"""

from __future__ import annotations

import contextlib

from tqdm.auto import tqdm

from ..lazy import lazy_import, no_grad

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def is_blockwise(model) -> bool:
    """Whether `model`'s blocks are not all resident where it computes: a lazy model, or an in-memory
    model whose attached onloader (`onload.attach`) computes on another device than the weights live on."""
    from ..onload import onloader

    return onloader(model).moves


def _tail(model) -> list:
    """The modules that turn the last block's outputs into logits, in order: the final norm, OPT's
    `project_out` (when the model has one) and the output head."""
    decoder = model.get_decoder()
    mods = [getattr(decoder, n, None) for n in ("norm", "final_layer_norm", "project_out")]
    return [m for m in mods if m is not None] + [model.get_output_embeddings()]


@contextlib.contextmanager
def _tail_on_device(model, device):
    """The tail modules (`_tail`) on `device` while inside; an output head still on the meta device (a lazy
    model's untied head) is read from the checkpoint onto `device` and dropped back to meta afterwards.
    Modules that were moved go back where they were (a tied head moves its embedding with it)."""
    from ..models.sharded import load_head

    head = model.get_output_embeddings()
    read_head = head.weight.device.type == "meta"
    if read_head:
        load_head(model, device)
    moved = []
    for m in _tail(model):
        param = next(m.parameters(), None)
        home = param.device if param is not None else device
        if home != torch.device(device):
            m.to(device)
            moved.append((m, home))
    try:
        yield
    finally:
        for m, home in moved:
            m.to(home)
        if read_head:
            head.to_empty(device="meta")


def _logits(model, tail, h):
    """Logits (b, seqlen, vocab) in float32 of final hidden states h (b, seqlen, hidden), with the final
    logit soft-capping of the families that have it."""
    for m in tail:
        h = m(h)
    logits = h.float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@no_grad
def _final_hidden(model, windows, batch_size: int, visit=None, progress: bool = False):
    """The last block's outputs (n, seqlen, hidden) for `windows` (n, seqlen) int64, block by block."""
    from ..engine import capture_inputs, run_block
    from ..models import get_blocks
    from ..onload import onloader

    on = onloader(model)
    X, kwargs = capture_inputs(model, windows)
    Y = torch.empty(X.shape, dtype=X.dtype, device=X.device, pin_memory=X.is_pinned())
    for i in tqdm(range(len(get_blocks(model))), desc="ppl blockwise", unit="block", disable=not progress,
                  leave=False):
        block = on.block(i)
        try:
            if visit is not None:
                visit(i, block)
            run_block(block, X, kwargs[i], Y, batch_size)
        finally:
            on.release(i)
        X, Y = Y, X
    return X


@no_grad
def blockwise_nll(model, windows, batch_size: int = 1, visit=None, progress: bool = False) -> list[float]:
    """The summed NLL (nats) of each window's seqlen − 1 shifted targets, block by block.

    windows: (n, seqlen) int64 token ids. batch_size: windows per block forward and per head forward.
    visit(i, block): called while block i is on the device (checks, counts), before it runs.
    Returns n floats, in order (`perplexity` divides by seqlen − 1 and checks that they are finite)."""
    from ..onload import onloader

    device = onloader(model).device
    H = _final_hidden(model, windows, batch_size, visit, progress)
    out = []
    with _tail_on_device(model, device):
        tail = _tail(model)
        for b in range(0, H.shape[0], batch_size):
            logits = _logits(model, tail, H[b : b + batch_size].to(device))
            x = windows[b : b + batch_size].to(device)
            for j in range(x.shape[0]):
                out.append(float(F.cross_entropy(logits[j, :-1], x[j, 1:], reduction="sum")))
            del logits
    return out


@no_grad
def blockwise_logits(model, input_ids, batch_size: int = 1):
    """The logits (n, seqlen, vocab), float32 on the CPU, of `input_ids` (n, seqlen) int64 through the
    block-by-block path (what `blockwise_nll` scores): for comparing a lazy model with a plain load on a few
    windows (all n logits are held, so keep n small)."""
    from ..onload import onloader

    device = onloader(model).device
    H = _final_hidden(model, input_ids, batch_size)
    with _tail_on_device(model, device):
        tail = _tail(model)
        return torch.cat([_logits(model, tail, H[b : b + batch_size].to(device)).cpu()
                          for b in range(0, H.shape[0], batch_size)])
