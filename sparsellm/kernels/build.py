"""Build (on first use) and load the C++ kernels of bitmap_spmm.cpp as a torch extension.

The build runs `torch.utils.cpp_extension.load` with g++ -O3 -march=native -fopenmp and ninja; it is cached
in $TORCH_EXTENSIONS_DIR, else ~/.cache/sparsellm/kernels, under a name made of a hash of the source and of
this CPU's instruction-set flags, so a cache shared between machines never loads a build for another CPU.
Without a compiler, ninja or AVX2+FMA+F16C, `load()` returns None once and logs one warning line; the
callers then use the pure-PyTorch path (format.reference_mm). SPARSELLM_KERNELS=pytorch forces that path;
SPARSELLM_KERNEL_ISA=avx2 compiles the AVX2 kernels on an AVX-512 machine (for tests and comparisons).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("sparsellm")
SOURCE = Path(__file__).with_name("bitmap_spmm.cpp")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor()


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sparsellm" / "kernels"


@functools.lru_cache(maxsize=None)
def load(isa: str | None = None):
    """The compiled extension module (functions spmm_expand, spmm_tiled, pack_bitmap, isa, lanes), or None where it
    cannot be built (one warning line says why). `isa`: None (the best this CPU has, -march=native) or
    "avx2" (AVX2 + FMA + F16C only); default from $SPARSELLM_KERNEL_ISA."""
    if os.environ.get("SPARSELLM_KERNELS", "").lower() == "pytorch":
        log.warning("sparsellm: SPARSELLM_KERNELS=pytorch: sparse linears use the pure-PyTorch CSR path (slow)")
        return None
    isa = isa or os.environ.get("SPARSELLM_KERNEL_ISA") or "native"
    flags = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mno-avx512f"]}.get(isa)
    if flags is None:
        raise ValueError(f"SPARSELLM_KERNEL_ISA must be 'avx2' or unset, got {isa!r}")
    try:
        from torch.utils.cpp_extension import load as cpp_load

        key = hashlib.sha1(SOURCE.read_bytes() + _cpu_flags().encode() + isa.encode()).hexdigest()[:12]
        d = build_dir() / f"bitmap_spmm_{isa}_{key}"
        d.mkdir(parents=True, exist_ok=True)
        return cpp_load(name=f"sparsellm_bitmap_spmm_{isa}_{key}", sources=[str(SOURCE)], build_directory=str(d),
                        extra_cflags=["-O3", "-fopenmp", "-std=c++17", *flags], extra_ldflags=["-fopenmp"],
                        verbose=False)
    except Exception as e:  # no compiler, no ninja, no AVX2, a failed build: all mean the fallback
        why = " ".join(str(e).split())[:200]
        log.warning(f"sparsellm: compiled sparse kernels unavailable ({type(e).__name__}: {why}); "
                    "using the pure-PyTorch CSR path (slow)")
        return None
