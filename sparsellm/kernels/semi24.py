"""2:4 semi-structured sparse linears on NVIDIA GPUs through `torch.sparse.to_sparse_semi_structured`
(PyTorch's CUTLASS and cuSPARSELt kernels, sm80+; docs: pytorch.org/docs/stable/sparse.html
"Sparse Semi-Structured Tensors"). The backend is set explicitly with
`SparseSemiStructuredTensor._FORCE_CUTLASS` (True: CUTLASS, False: cuSPARSELt), before each conversion.
Weights must be float16 or bfloat16 on CUDA with at most 2 non-zeros in every 4 consecutive inputs.

Measured on an H200 with torch 2.11 (BENCHMARKS.md §13d): PyTorch's CUTLASS kernels run only on compute
capability 8.x (A100, A10, RTX 30xx/40xx) and fail on 9.0 ("Supported only on GPUs with compute capability
8.x"), so "auto" takes cuSPARSELt wherever it is available. Each eager cuSPARSELt call cost about 0.9 ms
there outside the kernel, whatever the shape (it vanished under CUDA-graph replay): the kernels pay off only
where that is hidden and the multiply is large (prefill, 512 tokens or more).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError

BACKENDS = ("auto", "cutlass", "cusparselt")


def check_available(backend: str, device=None) -> str:
    """The backend to use for `backend` on the CUDA `device` (None: the current one; "auto": cusparselt where
    torch has it, else cutlass). Raises UsageError (one line) for a name not in BACKENDS, no CUDA, a GPU older
    than compute capability 8.0 (no 2:4 tensor cores), cuSPARSELt missing from this torch build, or CUTLASS on
    a GPU whose compute capability is not 8.x (PyTorch's CUTLASS 2:4 kernels are built for sm80)."""
    if backend not in BACKENDS:
        raise UsageError(f"the 2:4 backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not torch.cuda.is_available():
        raise UsageError("2:4 semi-structured kernels (torch.sparse.to_sparse_semi_structured) need CUDA, "
                         "and no CUDA device is available")
    has_lt = bool(getattr(torch.backends, "cusparselt", None)) and torch.backends.cusparselt.is_available()
    if backend == "auto":
        backend = "cusparselt" if has_lt else "cutlass"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise UsageError(f"2:4 semi-structured kernels need compute capability 8.0 or newer, and this GPU is "
                         f"{major}.{minor}")
    if backend == "cutlass" and major != 8:
        raise UsageError(f"PyTorch's CUTLASS 2:4 kernels run only on compute capability 8.x, and this GPU is "
                         f"{major}.{minor}" + (": use the cusparselt backend" if has_lt else
                                               "; this torch build has no cuSPARSELt either"))
    if backend == "cusparselt" and not has_lt:
        raise UsageError("this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
                         + ("; use the cutlass backend" if major == 8 else ""))
    return backend


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise UsageError unless every group of 4 consecutive inputs of each row of `weight` (out, in) has at
    most 2 non-zeros (and in is a multiple of 4)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise UsageError(f"{name}: a 2:4 weight needs a 2-D shape with inputs a multiple of 4, got {tuple(weight.shape)}")
    nz = (weight.detach() != 0).view(weight.shape[0], -1, 4).sum(-1)
    if (nz > 2).any():
        raise UsageError(f"{name} is not 2:4 sparse ({int((nz > 2).sum())} groups of 4 have more than 2 non-zeros); "
                         "prune with --pattern 2:4")


def _set_backend(backend: str) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"


class SemiStructuredLinear(nn.Module):
    """y = x W^T + b with W a SparseSemiStructuredTensor on CUDA. x: (..., in) in W's dtype (float16 or
    bfloat16) on the same device -> (..., out). Keeps the original weight Parameter for an exact densify."""

    def __init__(self, linear: nn.Linear, backend: str = "cusparselt"):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        w = linear.weight
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            raise UsageError("2:4 kernels need the model on CUDA in float16 or bfloat16 (load it with that dtype "
                             f"and move it to the GPU); got {w.dtype} on {w.device}")
        _set_backend(backend)
        self.backend = backend
        self.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        self.bias = linear.bias
        self.original = w
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "cusparselt") -> "SemiStructuredLinear":
        return cls(linear, backend)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight: half the values plus the metadata (1/8 of the dense bytes for fp16)."""
        return self.original.numel() * self.original.element_size() * 9 // 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.nn.functional.linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        return self.original
