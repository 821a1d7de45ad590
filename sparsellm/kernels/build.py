"""Build (on first use) and load the C++ kernels of bitmap_spmm.cpp as a torch extension.

The build runs `torch.utils.cpp_extension.load` with g++ -O3 -march=native -fopenmp and ninja, in a child
process with a time limit ($SPARSELLM_KERNEL_BUILD_TIMEOUT seconds, default 600), in a fresh temporary folder;
the finished .so is then moved into place atomically. The cache is $TORCH_EXTENSIONS_DIR, else
~/.cache/sparsellm/kernels, under a name made of a hash of the source and of this CPU's instruction-set flags,
so a cache shared between machines never loads a build for another CPU. Concurrent first uses wait on an
fcntl lock that the kernel releases when its holder dies, so a build killed half-way (Ctrl-C) leaves nothing
behind that blocks the next run (torch's own lock file would make every later load wait forever).
Without a compiler, ninja or AVX2+FMA+F16C, or when the build fails or runs past its time, `load()` returns
None once and logs one warning line; the callers then use the pure-PyTorch path (format.reference_mm).
SPARSELLM_KERNELS=pytorch forces that path; SPARSELLM_KERNEL_ISA=avx2 compiles the AVX2 kernels on an AVX-512
machine (for tests and comparisons).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("sparsellm")
SOURCE = Path(__file__).with_name("bitmap_spmm.cpp")
FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mno-avx512f"]}


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


def build_timeout() -> float:
    """Seconds one build may take: $SPARSELLM_KERNEL_BUILD_TIMEOUT, default 600 (about 20 s on 2 cores here)."""
    return float(os.environ.get("SPARSELLM_KERNEL_BUILD_TIMEOUT", "600"))


def _compile(folder: str, name: str, isa: str) -> None:
    """The child process's work: compile (and import, as a check) the extension in `folder`."""
    from torch.utils.cpp_extension import load as cpp_load

    cpp_load(name=name, sources=[str(SOURCE)], build_directory=folder, verbose=False,
             extra_cflags=["-O3", "-fopenmp", "-std=c++17", *FLAGS[isa]], extra_ldflags=["-fopenmp"])


def _build(so: Path, name: str, isa: str, timeout: float) -> None:
    """Make `so` exist: under an fcntl lock on `<so's folder>.lock`, unless another process finished it while
    this one waited, compile in a child process into a temporary folder and move the .so into place.
    Raises TimeoutError (the lock or the build took over `timeout` s) or RuntimeError (the build failed)."""
    folder = so.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(folder.parent / f"{folder.name}.lock", "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {folder} for over {timeout:.0f} s")
                time.sleep(0.5)
        if so.exists():
            return
        for stale in folder.parent.glob(f"{folder.name}.tmp*"):  # left by a build whose process was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp")
        try:
            child = subprocess.Popen([sys.executable, __file__, tmp, name, isa], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # its own process group: ninja and g++ go with it
            try:
                out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                raise TimeoutError(f"the build ran past {timeout:.0f} s ($SPARSELLM_KERNEL_BUILD_TIMEOUT)") from None
            if child.returncode != 0:
                lines = [s for s in out.splitlines() if s.strip()]
                raise RuntimeError(lines[-1] if lines else f"the build exited with {child.returncode}")
            folder.mkdir(exist_ok=True)
            os.replace(Path(tmp) / so.name, so)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def load(isa: str | None = None):
    """The compiled extension module (functions spmm_expand, spmm_tiled, pack_bitmap, isa, lanes), or None where it
    cannot be built (one warning line says why). `isa`: None (the best this CPU has, -march=native) or
    "avx2" (AVX2 + FMA + F16C only); default from $SPARSELLM_KERNEL_ISA. Raises ValueError for another isa."""
    if os.environ.get("SPARSELLM_KERNELS", "").lower() == "pytorch":
        log.warning("sparsellm: SPARSELLM_KERNELS=pytorch: sparse linears use the pure-PyTorch CSR path (slow)")
        return None
    isa = isa or os.environ.get("SPARSELLM_KERNEL_ISA") or "native"
    if isa not in FLAGS:
        raise ValueError(f"SPARSELLM_KERNEL_ISA must be 'avx2' or unset, got {isa!r}")
    try:
        import torch  # noqa: F401  (the extension's symbols come from libtorch)

        key = hashlib.sha1(SOURCE.read_bytes() + _cpu_flags().encode() + isa.encode()).hexdigest()[:12]
        name = f"sparsellm_bitmap_spmm_{isa}_{key}"
        so = build_dir() / f"bitmap_spmm_{isa}_{key}" / f"{name}.so"
        if not so.exists():
            _build(so, name, isa, build_timeout())
        spec = importlib.util.spec_from_file_location(name, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # no compiler, no ninja, no AVX2, a failed or timed-out build: all mean the fallback
        why = " ".join(str(e).split())[:200]
        log.warning(f"sparsellm: compiled sparse kernels unavailable ({type(e).__name__}: {why}); "
                    "using the pure-PyTorch CSR path (slow)")
        return None


if __name__ == "__main__":  # the child process of _build
    _compile(*sys.argv[1:])
