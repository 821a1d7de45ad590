"""Masked LoRA: a low-rank update restricted to the sparse weight's support, so that merging it keeps every
zero (LoSA, Huang et al., ICLR 2025, §3.2; algorithms.md §8.1).

    ΔW = (B[:, :r_l] @ A[:r_l, :]) ⊙ M          M = (W_s ≠ 0), the mask of the sparse base weight
    y  = W_s x + (α / r) · ΔW · dropout(x)
    merge:   W_s ← W_s + (α/r)·ΔW               exactly as sparse as M (the product is masked, not the factors)
    unmerge: W_s ← W_s − (α/r)·ΔW               with the same mask, which is kept from before the merge

Merges and unmerges compute ΔW and the sum in float32 and cast to the weight's dtype once, so a bf16 weight
is rounded once, not three times (a bf16 product, a bf16 scaling, a bf16 add); autocast is off inside them, so
a merge under `torch.autocast` is still float32.

The factors A and B are float32 whatever the base weight's dtype (master weights: a bf16 or fp16 model trains
fp32 adapters, with autocast on a GPU); the adapter's output is cast to the input's dtype.

A (r_max × C_in) and B (C_out × r_max) are created at `r_max` and the active rank r_l is a slice, so a rank
above the default 8 is real (the reference code silently truncates it). The scaling uses the configured
r, not r_l (as the reference). B starts at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models import block_linears, get_blocks


class MaskedLoraLinear(nn.Module):
    """Wraps a (sparse) nn.Linear `base` (C_out × C_in). r: the configured rank (scaling α/r), r_max: the
    size of the factors (>= r), rank: the active rank r_l in [1, r_max]. Raises UsageError for bad ranks."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.1,
                 r_max: int | None = None, rank: int | None = None):
        super().__init__()
        r_max = r if r_max is None else r_max
        if r < 1 or r_max < r:
            raise UsageError(f"LoRA rank r must be >= 1 and <= r_max, got r={r}, r_max={r_max}")
        self.base, self.r, self.r_max, self.scaling = base, r, r_max, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r_max, base.in_features, dtype=torch.float32, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r_max, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft's LoRA
        self.register_buffer("mask", base.weight.detach() != 0, persistent=False)
        self.rank = r if rank is None else rank
        self.set_rank(self.rank)
        self.merged = False
        base.weight.requires_grad_(False)

    def set_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.r_max:
            raise UsageError(f"LoRA rank {rank} is outside [1, r_max = {self.r_max}]")
        self.rank = int(rank)

    def refresh_mask(self) -> None:
        """Take the mask from the base weight again. On a merged layer whose merged weight was just
        re-pruned (LoSA's step), the next `unmerge` then subtracts the update restricted to the new mask,
        so pruned positions stay exactly zero and a pruner's weight updates (SparseGPT) are kept."""
        self.mask = self.base.weight.detach() != 0

    def check_mask(self) -> None:
        """Raise NonFiniteError if the merged weight is not finite, RuntimeError if it has a non-zero outside the
        mask (a merge must never do that)."""
        if not bool(torch.isfinite(self.base.weight.detach()).all()):
            from ..errors import NonFiniteError

            raise NonFiniteError("the merged weight is not finite: training diverged (lower --lr?) or the input's "
                                 "activations overflowed")
        if bool((self.base.weight.detach()[~self.mask] != 0).any()):
            raise RuntimeError("the merged weight has non-zeros outside the sparsity mask")

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(α/r) · (B[:, :r_l] @ A[:r_l]) ⊙ M, shape (C_out, C_in), in the factors' dtype, or computed in
        `dtype` (the factors are cast first: float32 for merges)."""
        r = self.rank
        A, B = self.lora_A[:r], self.lora_B[:, :r]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A) * self.mask * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        x = self.dropout(x)
        return y + F.linear(x, self.delta().to(x.dtype))  # under autocast F.linear casts both anyway

    @torch.no_grad()
    def merge(self) -> None:
        """W ← cast(float32(W) + ΔW computed in float32): one rounding to the weight's dtype."""
        if not self.merged:
            W = self.base.weight
            with _no_autocast(W):
                W.copy_((W.float() + self.delta(torch.float32)).to(W.dtype))
            self.merged = True
            self.check_mask()

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← cast((float32(W) − ΔW) ⊙ M), ΔW in float32; positions outside the mask are exactly zero again."""
        if self.merged:
            W = self.base.weight
            with _no_autocast(W):
                W.copy_(((W.float() - self.delta(torch.float32)) * self.mask).to(W.dtype))
            self.merged = False


def _no_autocast(w: torch.Tensor):
    """Autocast off on `w`'s device (a merge's product must stay float32 even inside an autocast region)."""
    return torch.autocast(device_type=w.device.type, enabled=False)


def add_masked_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.1,
                    r_max: int | None = None, targets: tuple[str, ...] | None = None) -> list[MaskedLoraLinear]:
    """Replace the block linears (all of them, or those whose name is in `targets`, e.g. "self_attn.q_proj")
    of every decoder block by MaskedLoraLinear, in place; freeze everything else. Returns the new layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for block in get_blocks(model):
        for name, lin in block_linears(model, block).items():
            if targets is not None and name not in targets:
                continue
            layer = MaskedLoraLinear(lin, r, alpha, dropout, r_max)
            layer.train(model.training)  # an eval-mode model stays deterministic (dropout off)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, layer)
            layers.append(layer)
    if not layers:
        raise UsageError(f"no block linear matches the LoRA targets {targets}")
    return layers


def lora_layers(model: nn.Module) -> list[MaskedLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MaskedLoraLinear)]


def merge(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def set_ranks(model: nn.Module, ranks: list[int]) -> None:
    """Active rank per decoder block (all adapted linears of block i get ranks[i]). Raises UsageError."""
    blocks = get_blocks(model)
    if len(ranks) != len(blocks):
        raise UsageError(f"{len(ranks)} ranks for {len(blocks)} blocks")
    for block, r in zip(blocks, ranks):
        for m in block.modules():
            if isinstance(m, MaskedLoraLinear):
                m.set_rank(r)


@contextmanager
def unwrapped(model: nn.Module):
    """Put every (merged) MaskedLoraLinear's base linear back in its place for the duration, so pruners and
    the block engine see plain nn.Linear layers (LoSA re-prunes the merged weights); the adapters are
    restored on exit. Raises RuntimeError if an adapter is not merged."""
    swaps = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, MaskedLoraLinear):
                if not child.merged:
                    raise RuntimeError("merge the adapters before re-pruning")
                swaps.append((parent, attr, child))
    for parent, attr, child in swaps:
        setattr(parent, attr, child.base)
    try:
        yield
    finally:
        for parent, attr, child in swaps:
            setattr(parent, attr, child)


def remove_adapters(model: nn.Module) -> None:
    """Merge every adapter and replace it by its base linear, leaving a plain transformers model."""
    merge(model)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, MaskedLoraLinear):
                setattr(parent, attr, child.base)


def adapter_ranks(model: nn.Module) -> list[int]:
    """Active rank of each decoder block (of its first adapted linear)."""
    out = []
    for block in get_blocks(model):
        out.append(next(m.rank for m in block.modules() if isinstance(m, MaskedLoraLinear)))
    return out
