"""What every run records about where it ran: package versions and peak memory."""

from __future__ import annotations

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
