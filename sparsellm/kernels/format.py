"""The bitmap format of a pruned linear weight, and its pure-PyTorch reference multiply.

A weight W of shape (out, in) is stored as
    bits     int16 (out, G), G = ceil(in / 16): bit k of bits[r, g] is set iff W[r, 16 g + k] != 0
    values   fp16, bf16, fp32 or int8 (nnz + 32,): the non-zeros in row-major order, then 32 zeros of padding
             (the kernels load 16 or 32 values at a time)
    row_ptr  int64 (out + 1,): row r's values are values[row_ptr[r]:row_ptr[r + 1]]
    scales   fp32 (out,), int8 values only (None otherwise): row r's weights are scales[r] * values
so a weight costs 1/8 byte for its bit plus, if it is kept, the value's bytes. Bytes per weight (the row
pointers add 8 bytes per row, and int8's scales 4 more, < 0.03 byte per weight at in = 576):

    sparsity            0%      50%     70%     90%     99%
    int8 values         1.125   0.625   0.425   0.225   0.135   (+ 4 bytes per row of scale)
    fp16 / bf16 values  2.125   1.125   0.725   0.325   0.145
    fp32 values         4.125   2.125   1.325   0.525   0.165
    dense fp32          4       4       4       4       4

Against the obvious alternative, CSR with uint16 column indices (4 bytes per kept fp16 value: 2.0, 1.2, 0.4
at 50/70/90%), the bitmap is smaller below ~94% sparsity, the range where pruned LLMs live, and the decode
kernel reads it as dense-shaped 16-column groups (AVX-512 `vexpandps`) instead of gathering x.

int8 values (sparsity and quantization together): symmetric, one fp32 scale per output row,
scale_r = max_j |W[r, j]| / 127 (over the row's kept weights; a row of zeros gets scale 0), values =
round(W / scale_r) (half to even) clamped to [-127, 127]. The bitmap is still W's mask: a non-zero weight
that rounds to int8 0 (|W| < scale_r / 2) keeps its bit and stores a 0, so `mask`, `nnz` and `sparsity`
describe the pruned weight exactly and only its value is lost. The multiplies convert int8 to fp32, sum
value * x in fp32 and multiply each row's sum by its scale at the end.

`to_dense` rebuilds W as stored: bit-exact when the values were stored in W's own dtype, else W rounded to
the value dtype; for int8, the dequantized fp32 scales[r] * values (exactly that product, not W).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import UsageError

GROUP = 16  # columns per bitmap word
PAD = 32  # values of zero padding after the last non-zero (the kernels check it is there)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}  # pack_bitmap's value dtype codes
QMAX = 127  # int8 values lie in [-QMAX, QMAX] (symmetric: -128 is never used)
_BIT = 1 << torch.arange(GROUP, dtype=torch.int32)


@dataclass
class BitmapWeight:
    """A (out, in) weight in the bitmap format (see the module docstring). Build with `BitmapWeight.pack`."""

    bits: torch.Tensor  # int16 (out, G)
    values: torch.Tensor  # value dtype (nnz + PAD,)
    row_ptr: torch.Tensor  # int64 (out + 1,)
    shape: tuple[int, int]
    scales: torch.Tensor | None = None  # fp32 (out,) for int8 values, else None

    @staticmethod
    @torch.no_grad()
    def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float16, compiled: bool = True) -> "BitmapWeight":
        """Pack a dense (out, in) float weight; zeros (exact 0.0 or -0.0) are dropped, the rest rounded to
        `dtype` (float16, bfloat16 or float32) or quantized to int8 with per-row fp32 scales (see the module
        docstring). Raises UsageError for another dtype, a weight that is not 2-D, NaN/inf weights, or
        values that overflow float16 (use bfloat16). `compiled`: use the extension's
        single-threaded packer (build.load(); two passes over the weight) where it is available, else the
        torch ops below (the same bits, values and row pointers; ~20x slower on a loaded 2-core machine,
        where every multi-threaded torch op waits on a descheduled thread)."""
        if dtype not in VALUE_DTYPES:
            raise UsageError(f"sparse kernel values must be float16, bfloat16, float32 or int8, got {dtype}")
        if weight.dim() != 2:
            raise UsageError(f"a sparse linear weight must be 2-D, got shape {tuple(weight.shape)}")
        w = weight.detach().to("cpu")
        ext = _ext() if compiled else None
        if ext is not None:
            bits, values, row_ptr, stats, scales = ext.pack_bitmap(w.float().contiguous(), _CODE[dtype])
            finite, amax = bool(stats[1]), float(stats[0])
        else:
            finite = bool(torch.isfinite(w).all())
            amax = float(w.abs().max()) if finite and w.numel() else 0.0
        if not finite:
            raise UsageError("a sparse linear weight has NaN/inf values")
        if dtype == torch.float16 and amax > torch.finfo(torch.float16).max:
            raise UsageError("weights exceed the float16 range; store the values as bfloat16")
        if dtype == torch.bfloat16 and torch.tensor(amax).to(dtype).isinf():
            raise UsageError("weights exceed the bfloat16 range; store the values as float32")
        if ext is not None:
            return BitmapWeight(bits, values, row_ptr, tuple(w.shape), scales if dtype == torch.int8 else None)
        out, n_in = w.shape
        g = -(-n_in // GROUP)
        mask = w != 0
        scales = None
        if dtype == torch.int8:
            scales, q = quantize_rows(w)
            vals = q[mask]
        else:
            vals = w[mask].to(dtype)
        mpad = torch.nn.functional.pad(mask, (0, g * GROUP - n_in)).view(out, g, GROUP).to(torch.int32)
        words = (mpad * _BIT).sum(-1)
        bits = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
        row_ptr = torch.zeros(out + 1, dtype=torch.int64)
        row_ptr[1:] = mask.sum(1).cumsum(0)
        values = torch.cat([vals, torch.zeros(PAD, dtype=dtype)])
        return BitmapWeight(bits.contiguous(), values.contiguous(), row_ptr, (out, n_in), scales)

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes a multiply reads: bitmap, values (without padding), row pointers and (int8) row scales."""
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.bits.numel() * 2 + self.nnz * self.values.element_size() + self.row_ptr.numel() * 8 + scales

    def mask(self) -> torch.Tensor:
        """bool (out, in): where the weight is stored."""
        words = self.bits.to(torch.int32) & 0xFFFF
        m = (words.unsqueeze(-1) & _BIT) != 0
        return m.view(self.shape[0], -1)[:, : self.shape[1]]

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight as stored, in `dtype` (default: the value dtype; float32 for int8 values, whose
        weight is the dequantized scales[r] * values, computed in fp32)."""
        vals = self.values[: self.nnz]
        if self.scales is not None:
            rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.row_ptr.diff())
            vals = vals.float() * self.scales[rows]
        w = torch.zeros(self.shape, dtype=vals.dtype)
        w[self.mask()] = vals
        return w if dtype is None else w.to(dtype)

    def csr(self) -> torch.Tensor:
        """The weight as a torch.sparse_csr fp32 tensor (the fallback's operand). For int8 values: the int8
        codes as fp32, without the scales (reference_mm applies them to each row's sum)."""
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
    values and fp32 accumulation (the same math as the compiled kernels, in another summation order); int8
    values: the codes' sums times each row's scale. `csr`: weight.csr(), if already made."""
    csr = weight.csr() if csr is None else csr
    y = torch.sparse.mm(csr, x.t()).t()
    return y if weight.scales is None else y * weight.scales


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of a (out, in) float weight: (scales fp32 (out,), codes int8 (out,
    in)) with scales = max |w_r| / 127 (0 for a row of zeros, whose codes are 0) and codes = round(w / scale)
    (half to even) clamped to [-127, 127]; the compiled packer computes the same, bit for bit."""
    w = w.float()
    amax = w.abs().amax(1) if w.shape[1] else torch.zeros(w.shape[0])
    scales = amax / QMAX
    s = scales[:, None]
    q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-QMAX, QMAX)
    return scales, q.to(torch.int8)
