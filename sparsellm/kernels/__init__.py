"""Speed from the zeros: CPU sparse kernels for pruned linears (bitmap format, C++ AVX2/AVX-512 + OpenMP,
built on first use, with a pure-PyTorch fallback), 2:4 on CUDA, and the swap of a transformers model's
pruned linears (`sparsify` / `densify`). Timing of generation: `generate.py`."""

from .format import BitmapWeight, reference_mm
from .linear import SparseLinear, densify, sparsify, spmm

__all__ = ["BitmapWeight", "SparseLinear", "densify", "reference_mm", "sparsify", "spmm"]
