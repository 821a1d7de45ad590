"""The bitmap format of a pruned linear weight, and its pure-PyTorch reference multiply.

A weight W of shape (out, in) is stored as
    bits     int16 (out, G), G = ceil(in / 16): bit k of bits[r, g] is set iff W[r, 16 g + k] != 0
    values   fp16, bf16 or fp32 (nnz + 16,): the non-zeros in row-major order, then 16 zeros of padding
             (the kernel loads 16 values at a time)
    row_ptr  int64 (out + 1,): row r's values are values[row_ptr[r]:row_ptr[r + 1]]
so a weight costs 1/8 byte for its bit plus, if it is kept, the value's bytes. Bytes per weight (the row
pointers add 8 bytes per row, < 0.02 byte per weight at in = 576):

    sparsity            0%      50%     70%     90%     99%
    fp16 / bf16 values  2.125   1.125   0.725   0.325   0.145
    fp32 values         4.125   2.125   1.325   0.525   0.165
    dense fp32          4       4       4       4       4

Against the obvious alternative, CSR with uint16 column indices (4 bytes per kept fp16 value: 2.0, 1.2, 0.4
at 50/70/90%), the bitmap is smaller below ~94% sparsity, the range where pruned LLMs live, and the decode
kernel reads it as dense-shaped 16-column groups (AVX-512 `vexpandps`) instead of gathering x.

`to_dense` rebuilds W exactly as stored: bit-exact when the values were stored in W's own dtype, else W
rounded to the value dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import UsageError

GROUP = 16  # columns per bitmap word
PAD = 16  # values of zero padding after the last non-zero
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # pack_bitmap's value dtype codes
_BIT = 1 << torch.arange(GROUP, dtype=torch.int32)


@dataclass
class BitmapWeight:
    """A (out, in) weight in the bitmap format (see the module docstring). Build with `BitmapWeight.pack`."""

    bits: torch.Tensor  # int16 (out, G)
    values: torch.Tensor  # value dtype (nnz + PAD,)
    row_ptr: torch.Tensor  # int64 (out + 1,)
    shape: tuple[int, int]

    @staticmethod
    @torch.no_grad()
    def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float16, compiled: bool = True) -> "BitmapWeight":
        """Pack a dense (out, in) float weight; zeros (exact 0.0 or -0.0) are dropped, the rest rounded to
        `dtype` (float16, bfloat16 or float32). Raises UsageError for another dtype, a weight that is not 2-D,
        NaN/inf weights, or values that overflow float16 (use bfloat16). `compiled`: use the extension's
        single-threaded packer (build.load(); two passes over the weight) where it is available, else the
        torch ops below (the same bits, values and row pointers; ~20x slower on a loaded 2-core machine,
        where every multi-threaded torch op waits on a descheduled thread)."""
        if dtype not in VALUE_DTYPES:
            raise UsageError(f"sparse kernel values must be float16, bfloat16 or float32, got {dtype}")
        if weight.dim() != 2:
            raise UsageError(f"a sparse linear weight must be 2-D, got shape {tuple(weight.shape)}")
        w = weight.detach().to("cpu")
        ext = _ext() if compiled else None
        if ext is not None:
            bits, values, row_ptr, stats = ext.pack_bitmap(w.float().contiguous(), _CODE[dtype])
            finite, amax = bool(stats[1]), float(stats[0])
        else:
            finite = bool(torch.isfinite(w).all())
            amax = float(w.abs().max()) if finite and w.numel() else 0.0
        if not finite:
            raise UsageError("a sparse linear weight has NaN/inf values")
        if dtype == torch.float16 and amax > torch.finfo(torch.float16).max:
            raise UsageError("weights exceed the float16 range; store the values as bfloat16")
        if ext is not None:
            return BitmapWeight(bits, values, row_ptr, tuple(w.shape))
        out, n_in = w.shape
        g = -(-n_in // GROUP)
        mask = w != 0
        vals = w[mask].to(dtype)
        mpad = torch.nn.functional.pad(mask, (0, g * GROUP - n_in)).view(out, g, GROUP).to(torch.int32)
        words = (mpad * _BIT).sum(-1)
        bits = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
        row_ptr = torch.zeros(out + 1, dtype=torch.int64)
        row_ptr[1:] = mask.sum(1).cumsum(0)
        values = torch.cat([vals, torch.zeros(PAD, dtype=dtype)])
        return BitmapWeight(bits.contiguous(), values.contiguous(), row_ptr, (out, n_in))

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes a multiply reads: bitmap, values (without padding) and row pointers."""
        return (self.bits.numel() * 2 + self.nnz * self.values.element_size() + self.row_ptr.numel() * 8)

    def mask(self) -> torch.Tensor:
        """bool (out, in): where the weight is stored."""
        words = self.bits.to(torch.int32) & 0xFFFF
        m = (words.unsqueeze(-1) & _BIT) != 0
        return m.view(self.shape[0], -1)[:, : self.shape[1]]

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight as stored, in `dtype` (default: the value dtype)."""
        w = torch.zeros(self.shape, dtype=self.values.dtype)
        w[self.mask()] = self.values[: self.nnz]
        return w if dtype is None else w.to(dtype)

    def csr(self) -> torch.Tensor:
        """The weight as a torch.sparse_csr fp32 tensor (the fallback's operand)."""
        col = self.mask().nonzero()[:, 1]
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.row_ptr, col, self.values[: self.nnz].float(), self.shape,
                                           check_invariants=False)


def _ext():
    from . import build

    return build.load()


def reference_mm(weight: BitmapWeight, x: torch.Tensor, csr: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch multiply: x (T, in) fp32 -> x @ W.T (T, out) fp32, through torch.sparse CSR with fp32
    values and fp32 accumulation (the same math as the compiled kernels, in another summation order)."""
    csr = weight.csr() if csr is None else csr
    return torch.sparse.mm(csr, x.t()).t()
