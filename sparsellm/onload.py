"""Sequential onloading: one decoder block on the compute device at a time (SparseGPT's OPT-175B recipe,
llm-compressor's "sequential onloading").

The model's weights stay where they live: in CPU memory for a loaded model, or not loaded at all for a
lazy one (`models.sharded.lazy_model`, whose blocks sit on the meta device until their turn). The engine
asks for block i (`Onloader.block(i)`: moved to, or read from the shards onto, the compute device), works
on it, and gives it back (`Onloader.release(i, changed)`: moved back, or written to the output's shards by
the lazy model's `writer` and dropped). The modules before block 0 (embeddings, rotary and learned
positions) are on the device only while the block-0 inputs are captured (`Onloader.embeddings()`).

A model carries its onloader as `model.sparsellm_onload` (set by `attach`); a model without one is worked on
where its parameters are, as before.
"""

from __future__ import annotations

import contextlib
import logging

from .lazy import lazy_import
from .models import get_blocks

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

ATTR = "sparsellm_onload"


class Onloader:
    """Where `model`'s blocks are worked on (`device`) and where they live otherwise. `lazy`: the model's
    block reader (`models.sharded.lazy_model` sets it as `model.sparsellm_blocks`; None: an in-memory model). `loads` counts the blocks brought onto the
    device and `resident` the blocks materialised now (tests check that never more than two are)."""

    def __init__(self, model, device=None, lazy=None):
        self.model, self.lazy = model, lazy or getattr(model, "sparsellm_blocks", None)
        self.device = torch.device(device) if device is not None else self.home
        self.loads = self.peak_resident = 0
        self.resident: set[int] = set()

    @property
    def home(self):
        """Where the weights live: the device of the first loaded parameter outside the blocks (a model moved
        whole to the compute device afterwards then needs no onloading)."""
        inside = {id(p) for p in get_blocks(self.model).parameters()}
        first = next((p for p in self.model.parameters() if id(p) not in inside and p.device.type != "meta"), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def moves(self) -> bool:
        """Whether blocks move at all (a lazy model, or a compute device other than where the weights live)."""
        return self.lazy is not None or self.device != self.home

    def block(self, i: int):
        """Block i, materialised on the compute device."""
        block = get_blocks(self.model)[i]
        moves = self.moves
        if self.lazy is not None:
            self.lazy.load_block(self.model, i, self.device)
        elif moves:
            block.to(self.device)
        if moves:
            self.loads += 1
            self.resident.add(i)
            self.peak_resident = max(self.peak_resident, len(self.resident))
        return block

    def release(self, i: int, changed: bool = False) -> None:
        """Give block i back: an in-memory block moves home; a lazy block is written by the lazy model's
        writer when `changed` (and a writer is set), then dropped to the meta device."""
        block = get_blocks(self.model)[i]
        if self.lazy is not None:
            self.lazy.release_block(self.model, i, changed)
        elif self.device != self.home:
            block.to(self.home)
        self.resident.discard(i)

    @contextlib.contextmanager
    def embeddings(self):
        """The modules outside the blocks on the compute device, for capturing the block-0 inputs; moved back
        afterwards. A lazy model's input embeddings are read onto the device for this and dropped again (its
        output head stays unloaded)."""
        from .models.sharded import drop_embeddings, load_embeddings

        moved, home = [], self.home
        if self.lazy is not None:
            load_embeddings(self.model, self.device)
        if self.device != home:
            blocks = get_blocks(self.model)
            inside = {id(m) for m in blocks.modules()}
            for module in self.model.modules():
                if id(module) in inside:
                    continue
                own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                if not own or any(t.device.type == "meta" for t in own) or all(t.device == self.device for t in own):
                    continue
                module._apply(lambda t: t.to(self.device), recurse=False)
                moved.append(module)
        try:
            yield
        finally:
            for module in moved:
                module._apply(lambda t: t.to(home), recurse=False)
            if self.lazy is not None:
                drop_embeddings(self.model)


def attach(model, device=None, lazy=None) -> Onloader:
    """Give `model` an onloader for `device` (and its lazy checkpoint) and return it."""
    onloader = Onloader(model, device, lazy)
    setattr(model, ATTR, onloader)
    return onloader


def onloader(model) -> Onloader:
    """`model`'s onloader: the attached one, else one that works where the parameters are (attached for a
    lazy model, so its counts persist)."""
    found = getattr(model, ATTR, None)
    if found is not None:
        return found
    if getattr(model, "sparsellm_blocks", None) is not None:
        return attach(model)
    return Onloader(model)


def fits_on_device(device, nbytes: int, reserve: int) -> bool:
    """Whether `nbytes` of activations fit on `device` next to `reserve` bytes (blocks, statistics): always
    for the CPU (they are in memory either way)."""
    from .devices import free_bytes

    free = free_bytes(device)
    return free is None or nbytes + reserve <= 0.9 * free
