"""What every run records about where it ran and what it read: package versions, peak memory, and the
SHA-256 of the token tensors it used (calibration windows, fine-tuning examples)."""

from __future__ import annotations

import hashlib
import platform
import resource


def versions() -> dict:
    """Versions of sparsellm, torch, transformers and Python."""
    import torch
    import transformers

    from . import __version__

    return {"sparsellm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens_sha256(tokens) -> str:
    """SHA-256 (hex) of token tensors' bytes, in order: one tensor (calibration windows, (nsamples, seqlen)
    int64) or an iterable of tensors (each fine-tuning example's input_ids then its labels). What run
    records store as `tokens_sha256`: equal digests mean the same tokens in the same order."""
    h = hashlib.sha256()
    for t in [tokens] if hasattr(tokens, "numpy") else tokens:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
