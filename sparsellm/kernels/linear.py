"""`SparseLinear`, a drop-in for a pruned nn.Linear on CPU, and `sparsify` / `densify`, which swap every
pruned linear of a transformers model in place and back.

The forward computes in fp32 whatever the activation dtype (bf16 activations are converted, the output is
converted back): T <= EXPAND_MAX tokens go through the decode kernel (weights read once per 8 tokens), more
through the prefill kernel (nnz * T FMAs over token tiles). See bitmap_spmm.cpp and format.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from . import build
from .format import GROUP, BitmapWeight, reference_mm

log = logging.getLogger("sparsellm")
EXPAND_MAX = 8  # tokens per call up to which the decode (expand) kernel is used
# prefill column block, in 16-column groups: 192 columns x 64 tokens of fp32 = 48 KB of x per block. Against
# no blocking (and the earlier per-tile decode), 1 thread, 70%, fp16: 1.33x vs 1.21x (1.03x) dense at
# 576x1536 / 512 tokens, 1.44x vs 1.40x (1.17x) at 1536x576, on a loaded 2-core machine (noisy)
COLUMN_BLOCK = 12


def spmm(w: BitmapWeight, x: torch.Tensor, threads: int | None = None, csr=None) -> torch.Tensor:
    """x (T, in) fp32 -> x @ W.T (T, out) fp32 with the compiled kernels, or the PyTorch CSR path where they
    cannot be built. `threads`: OpenMP threads (default torch.get_num_threads())."""
    ext = build.load()
    if ext is None:
        return reference_mm(w, x, csr)
    return compiled_mm(ext, w, x, threads)


def compiled_mm(ext, w: BitmapWeight, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (T, in) fp32 -> (T, out) fp32 through the extension module `ext` (build.load()). Raises ValueError
    when x's width is not the weight's `in`."""
    threads = threads or torch.get_num_threads()
    T, n_in = x.shape
    if n_in != w.shape[1]:
        raise ValueError(f"x has {n_in} features; the sparse weight {tuple(w.shape)} takes {w.shape[1]}")
    in_pad = w.bits.shape[1] * GROUP
    if in_pad != n_in:
        x = F.pad(x, (0, in_pad - n_in))
    x = x.contiguous()
    if T <= EXPAND_MAX:
        return ext.spmm_expand(w.row_ptr, w.bits, w.values, x, threads, w.scales)
    lanes = ext.lanes()
    tt = min(4 * lanes, -(-T // lanes) * lanes)  # tokens per tile: up to 4 vectors
    tiles = -(-T // tt)
    if tiles * tt != T:
        x = F.pad(x, (0, 0, 0, tiles * tt - T))
    xt = x.view(tiles, tt, in_pad).transpose(1, 2).contiguous()  # (tiles, in_pad, tt)
    yt = ext.spmm_tiled(w.row_ptr, w.bits, w.values, xt, threads, COLUMN_BLOCK, w.scales)  # (tiles, out, tt)
    return yt.transpose(1, 2).reshape(tiles * tt, -1)[:T]


@torch.library.custom_op("sparsellm::bitmap_mm", mutates_args=())
def bitmap_mm(x: torch.Tensor, row_ptr: torch.Tensor, bits: torch.Tensor, values: torch.Tensor,
              scales: torch.Tensor | None, out_features: int, in_features: int) -> torch.Tensor:
    """x (T, in) fp32 -> (T, out) fp32, contiguous: `spmm` as a torch custom op, so torch.compile keeps a
    SparseLinear inside one graph (its fake below gives the shape) instead of breaking the graph at it."""
    w = BitmapWeight(bits, values, row_ptr, (out_features, in_features), scales)
    return spmm(w, x).contiguous()


@bitmap_mm.register_fake
def _(x, row_ptr, bits, values, scales, out_features, in_features):
    return x.new_empty((x.shape[0], out_features))


class SparseLinear(nn.Module):
    """y = x W^T + b with W in the bitmap format, for inference: no gradient flows back through the multiply.
    x: (..., in) float32/bfloat16/float16 -> (..., out) in x's dtype, computed in fp32. `original`: the
    nn.Linear's weight Parameter kept for an exact `densify` (None: `to_dense` rebuilds it in the value dtype;
    for int8 values, the dequantized scale * int8 in fp32)."""

    def __init__(self, weight: BitmapWeight, bias: torch.Tensor | None, original: torch.Tensor | None = None):
        super().__init__()
        self.weight_packed = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias  # the nn.Linear's own Parameter, so densify gives it back as it was
        self.original = original
        self.dense_dtype = original.dtype if original is not None else torch.float32
        self._csr = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float16, keep_original: bool = True):
        new = cls(BitmapWeight.pack(linear.weight, dtype), linear.bias, linear.weight if keep_original else None)
        new.dense_dtype = linear.weight.dtype
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if torch.compiler.is_compiling():  # one graph under torch.compile; eager skips the op's dispatch cost
            w = self.weight_packed
            y = bitmap_mm(x2.detach(), w.row_ptr, w.bits, w.values, w.scales, self.out_features, self.in_features)
        elif (ext := build.load()) is None:
            if self._csr is None:
                self._csr = self.weight_packed.csr()
            y = reference_mm(self.weight_packed, x2, self._csr)
        else:
            y = compiled_mm(ext, self.weight_packed, x2)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The dense (out, in) weight: the original Parameter where it was kept (bitwise), else the stored
        values in the value dtype (int8 values: the dequantized fp32 scales[r] * values, not the original W)."""
        return self.original if self.original is not None else self.weight_packed.to_dense()

    def extra_repr(self) -> str:
        w = self.weight_packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"values={str(w.values.dtype).replace('torch.', '')}, sparsity={w.sparsity:.3f}")


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(weight)) / max(1, weight.numel())


@torch.no_grad()
def sparsify(model: nn.Module, min_sparsity: float = 0.3, dtype: torch.dtype = torch.float16,
             keep_original: bool = True, lm_head: bool = False, kernels: str = "cpu",
             backend: str = "auto") -> dict:
    """Swap, in place, every nn.Linear of `model` whose weight is at least `min_sparsity` zeros for a sparse
    module, so `model(...)` and `model.generate(...)` run unchanged. The output embedding (lm_head) is swapped
    only if it was pruned (some zeros) or `lm_head` is True. `kernels`: "cpu" (SparseLinear, bitmap format,
    values in `dtype`: float16, bfloat16, float32, or int8 with per-row fp32 scales (format.py); keep_original
    keeps each weight Parameter for an exact `densify`) or "semi24"
    (`torch.sparse.to_sparse_semi_structured` on CUDA with `backend` "cutlass", "cusparselt" or "auto":
    cuSPARSELt where torch has it; see semi24.py). Below ~30% zeros the dense fp32 prefill is faster than the
    sparse one, hence the default.
    Returns {"kernels", "isa", "dtype", "swapped": {name: sparsity}, "skipped": {name: reason},
    "sparse_bytes", "dense_bytes"} (bytes of the swapped linears' weights, sparse format vs original).
    Raises UsageError for a min_sparsity outside [0, 1], an unknown `kernels`, (semi24) no CUDA or a
    weight that is not 2:4, or a weight that cannot be packed (NaN/inf, out of the value dtype's range; the
    message names the linear). Nothing is swapped when it raises."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise UsageError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if kernels not in ("cpu", "semi24"):
        raise UsageError(f"kernels must be 'cpu' or 'semi24', got {kernels!r}")
    if kernels == "semi24":
        from .semi24 import check_available, SemiStructuredLinear

        on = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
        backend = check_available(backend, on)  # the model's GPU, not the current one
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    record = {"kernels": kernels, "isa": None, "dtype": str(dtype).replace("torch.", ""), "swapped": {},
              "skipped": {}, "sparse_bytes": 0, "dense_bytes": 0}
    todo = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            s = _sparsity(child.weight)
            if child is head and not (lm_head or s > 0):
                record["skipped"][full] = "output embedding, not pruned"
            elif s < min_sparsity:
                record["skipped"][full] = f"sparsity {s:.3f} < min_sparsity {min_sparsity}"
            else:
                todo.append((mod, child_name, full, child, s))
    for mod, child_name, full, child, s in todo:  # check every weight before the first swap
        if kernels == "semi24":
            from .semi24 import check_24

            check_24(child.weight, full)
    new = {}  # every module is built before the first swap, so a weight that cannot be packed changes nothing
    for mod, child_name, full, child, s in todo:
        try:
            if kernels == "semi24":
                new[full] = SemiStructuredLinear.from_linear(child, backend)
                record["sparse_bytes"] += new[full].nbytes
            else:
                new[full] = SparseLinear.from_linear(child, dtype, keep_original)
                record["sparse_bytes"] += new[full].weight_packed.nbytes
        except UsageError as e:
            raise UsageError(f"{full}: {e}") from None
        record["dense_bytes"] += child.weight.numel() * child.weight.element_size()
    for mod, child_name, full, child, s in todo:
        setattr(mod, child_name, new[full])
        record["swapped"][full] = s
    if kernels == "cpu":
        ext = build.load()
        record["isa"] = ext.isa() if ext is not None else "pytorch-csr-fallback"
    else:
        record["isa"] = backend
    return record


@torch.no_grad()
def densify(model: nn.Module) -> int:
    """Swap every SparseLinear / SemiStructuredLinear of `model` back to nn.Linear, in place: the original
    weight Parameter where it was kept (bitwise the weight before `sparsify`), else the stored values cast
    to the original weight's dtype: W rounded to the value dtype, or for int8 values the dequantized
    scales[r] * int8 (W to within half a scale step per weight, not W). Returns the number of modules
    swapped back."""
    from .semi24 import SemiStructuredLinear

    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if not isinstance(child, (SparseLinear, SemiStructuredLinear)):
                continue
            w = child.to_dense()
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            if isinstance(w, nn.Parameter):
                lin.weight = w
            else:
                lin.weight = nn.Parameter(w.to(child.dense_dtype), requires_grad=False)
            if child.bias is not None:
                lin.bias = child.bias
            setattr(mod, child_name, lin)
            n += 1
    return n
