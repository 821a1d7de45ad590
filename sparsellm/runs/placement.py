"""Where a fine-tuning or search run keeps its model on the compute device (`--device`, `sparsellm.devices`).

    place(model, device, copies=1)   the model, loaded on the CPU, moved whole to `device` when `copies` times
                                     its weights fit in FIT of the device's free memory (faster: the engine then
                                     moves nothing); otherwise left on the CPU with an onloader attached, so the
                                     engine's passes (pruning, RMI, importance) bring one block at a time to the
                                     device (`sparsellm.onload`). `need_whole`: the run cannot work block by block
                                     (training): UsageError when it does not fit.

On the CPU nothing moves and nothing is attached: the run is exactly what it was before devices existed.
"""

from __future__ import annotations

import logging

from ..devices import model_bytes
from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

FIT = 0.8  # the share of the device's free memory the weights may take (the rest: activations, optimiser, copies)


def place(model, device, copies: float = 1.0, need_whole: bool = False, what: str = "the run") -> str:
    """Put `model` on `device` for a run (see the module doc). Returns "cpu" (nothing to do), "whole" (moved)
    or "onload" (kept on the CPU, blocks onloaded by the engine). Raises UsageError when `need_whole` and the
    model does not fit."""
    from ..devices import free_bytes
    from ..onload import attach

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    nbytes = model_bytes(model)
    free = free_bytes(device)
    if free is None or copies * nbytes <= FIT * free:
        model.to(device)
        attach(model, device)  # the weights now live on the device: the engine moves nothing
        log.info("the model (%.2f GiB) is on %s", nbytes / 2**30, device)
        return "whole"
    if need_whole:
        raise UsageError(f"{what} needs the whole model on {device}: {copies:g} × {nbytes / 2**30:.2f} GiB does not "
                         f"fit in {FIT:.0%} of its {free / 2**30:.2f} GiB free; use --device cpu or a larger GPU")
    attach(model, device)
    log.info("the model (%.2f GiB) does not fit on %s (%.2f GiB free): it stays in CPU memory and its blocks are "
             "onloaded one at a time", nbytes / 2**30, device, free / 2**30)
    return "onload"


def model_device(model):
    """The device of `model`'s first parameter that is not on the meta device (CPU if none)."""
    p = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")


__all__ = ["FIT", "model_bytes", "place", "model_device"]
