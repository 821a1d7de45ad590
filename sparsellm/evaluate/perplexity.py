"""Perplexity by the Wanda/SparseGPT protocol (algorithms.md §10.1): the text is tokenized once and cut
into floor(T / seqlen) non-overlapping windows; each window is scored on its own (no context carried over)
on its seqlen − 1 shifted targets; ppl = exp(total NLL / total predicted tokens). `batch_size` windows go
through one forward (the same numbers as batch 1, up to float rounding). A model whose blocks are not all
resident (a lazy model, or an onloader on another device) is scored block by block (`blockwise`)."""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from ..data import eval_source, eval_tokens
from ..errors import NonFiniteError, UsageError
from ..lazy import lazy_import, no_grad
from ..provenance import tokens_sha256

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


@no_grad
def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True, ids: torch.Tensor | None = None, batch_size: int = 1, visit=None) -> dict:
    """Perplexity of `model` on `dataset` ("wikitext2" test or "c4" validation).

    Returns {"metric": "wikitext2_ppl@2048", "ppl", "nll" (mean NLL in nats per token), "window_nll" (the
    mean NLL of each window, in order: exp(mean(window_nll[:k])) is the perplexity of the first k windows),
    "windows", "tokens" (predicted tokens), "seqlen", "dataset", "split" ("test" / "validation"), "source"
    (the bundled file) and "source_sha256" (its bytes), "tokens_sha256" (SHA-256 of the scored windows'
    token ids as int64), "max_windows", "total_windows", "batch_size", "blockwise" (whether it ran block by
    block), "device", "dtype"}. Raises UsageError if the text has fewer than seqlen tokens, max_windows < 1
    or batch_size < 1, NonFiniteError if a window's loss is NaN/inf (the model's logits are not finite): no
    `nan` perplexity is ever returned. ids: the dataset's token stream (1, T) if already tokenized
    (`eval_tokens`), to skip tokenizing again. batch_size: windows per forward; the logits of a batch,
    (batch_size, seqlen, vocab) in float32, are held at once. visit(i, block): on the block-by-block path,
    called while block i is on the device (see `blockwise.blockwise_nll`)."""
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {max_windows}")
    if batch_size < 1:
        raise UsageError(f"--eval_batch_size must be >= 1, got {batch_size}")
    ids = eval_tokens(tokenizer, dataset, seqlen) if ids is None else ids
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise UsageError(f"{dataset} has {ids.shape[1]} tokens, fewer than seqlen {seqlen}")
    if max_windows:
        windows = min(windows, max_windows)
    from ..onload import onloader
    from .blockwise import blockwise_nll, is_blockwise

    blockwise = is_blockwise(model)
    device = onloader(model).device if blockwise else next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    stream = ids[0, : windows * seqlen].reshape(windows, seqlen)
    if blockwise:
        sums = blockwise_nll(model, stream, batch_size, visit, progress)
    else:
        sums = []
        for b in tqdm(range(0, windows, batch_size), desc=f"ppl {dataset}", unit="batch", disable=not progress,
                      leave=False):
            x = stream[b : b + batch_size].to(device)
            logits = model(x, use_cache=False).logits.float()
            sums += [float(F.cross_entropy(logits[j, :-1], x[j, 1:], reduction="sum")) for j in range(x.shape[0])]
            del logits
    nll, count, window_nll = 0.0, 0, []
    for w, window in enumerate(sums):
        if not math.isfinite(window):
            raise NonFiniteError(f"{dataset} perplexity: the loss of window {w + 1} of {windows} is {window} (the "
                                 "model's logits are not finite; with --dtype bfloat16 try float32)")
        window_nll.append(window / (seqlen - 1))
        nll += window
        count += seqlen - 1
    try:
        ppl = math.exp(nll / count)
    except OverflowError:  # mean NLL above ~709 nats: a diverged model
        ppl = float("inf")
    src = eval_source(dataset)
    scored = ids[:, : windows * seqlen].to(torch.int64)
    return {"metric": f"{dataset}_ppl@{seqlen}", "ppl": ppl, "nll": nll / count,
            "window_nll": window_nll, "windows": windows, "tokens": count, "seqlen": seqlen, "dataset": dataset,
            "split": src["split"], "source": src["file"], "source_sha256": src["sha256"],
            "tokens_sha256": tokens_sha256(scored),
            "max_windows": max_windows, "total_windows": ids.shape[1] // seqlen, "batch_size": batch_size,
            "blockwise": blockwise, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
