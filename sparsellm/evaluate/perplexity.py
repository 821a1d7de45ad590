"""Perplexity by the Wanda/SparseGPT protocol (algorithms.md §10.1): the text is tokenized once and cut
into floor(T / seqlen) non-overlapping windows; each window is scored at batch 1 on its seqlen − 1
shifted targets; ppl = exp(total NLL / total predicted tokens)."""

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
               progress: bool = True, ids: torch.Tensor | None = None) -> dict:
    """Perplexity of `model` on `dataset` ("wikitext2" test or "c4" validation).

    Returns {"metric": "wikitext2_ppl@2048", "ppl", "nll" (mean NLL in nats per token), "window_nll" (the
    mean NLL of each window, in order: exp(mean(window_nll[:k])) is the perplexity of the first k windows),
    "windows", "tokens" (predicted tokens), "seqlen", "dataset", "split" ("test" / "validation"), "source"
    (the bundled file) and "source_sha256" (its bytes), "tokens_sha256" (SHA-256 of the scored windows'
    token ids as int64), "max_windows", "total_windows"}. Raises UsageError if the
    text has fewer than seqlen tokens or max_windows < 1, NonFiniteError if a window's loss is NaN/inf (the
    model's logits are not finite): no `nan` perplexity is ever returned. ids: the dataset's token stream (1, T) if already
    tokenized (`eval_tokens`), to skip tokenizing again."""
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {max_windows}")
    ids = eval_tokens(tokenizer, dataset, seqlen) if ids is None else ids
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise UsageError(f"{dataset} has {ids.shape[1]} tokens, fewer than seqlen {seqlen}")
    if max_windows:
        windows = min(windows, max_windows)
    device = next(model.parameters()).device
    nll, count, window_nll = 0.0, 0, []
    for w in tqdm(range(windows), desc=f"ppl {dataset}", unit="win", disable=not progress, leave=False):
        x = ids[:, w * seqlen : (w + 1) * seqlen].to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        window = float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
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
            "max_windows": max_windows, "total_windows": ids.shape[1] // seqlen}
