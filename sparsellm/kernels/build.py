"""Build (on first use) and load the C++ kernels (bitmap_spmm.cpp, pack_bitmap.cpp) as a torch extension.

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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("sparsellm")
SOURCES = [Path(__file__).with_name(f) for f in ("bitmap_spmm.cpp", "pack_bitmap.cpp")]
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
    """Seconds one build may take: $SPARSELLM_KERNEL_BUILD_TIMEOUT, default 600 (about 25 s on 2 cores here).
    Raises ValueError naming the variable for a value that is not a positive number ('inf' waits forever)."""
    raw = os.environ.get("SPARSELLM_KERNEL_BUILD_TIMEOUT", "").strip() or "600"
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also refuses nan, which would make the wait for the lock endless
        raise ValueError(f"$SPARSELLM_KERNEL_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: the build child, ninja, and the process groups that ninja makes for
    each compiler command (so os.killpg on the child's group alone would leave g++/cc1plus running)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(sid, signal.SIGKILL)
        except OSError:
            pass
        return
    for _ in range(5):  # a shell may fork between the scan and the kill: scan again until nothing is left
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z" and int(stat.parent.name) != os.getpid():
                alive.append(int(stat.parent.name))
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def _why(out: str, returncode: int) -> str:
    """The most telling line of a failed build's output: the last compiler/linker error, else the last line."""
    lines = [s.strip() for s in out.splitlines() if s.strip()]
    for line in reversed(lines):
        if not line.startswith("ninja:") and re.search(r"error|not found|no such file|cannot", line, re.I):
            return line
    return lines[-1] if lines else f"the build exited with {returncode}"


def cached_so(isa: str) -> Path:
    """Where the build for `isa` is cached: named by a hash of the sources, this CPU's flags, the compile flags,
    torch's version and Python's ABI (the .so links against both, and one cache may serve several venvs)."""
    import torch

    key = hashlib.sha1(b"".join(f.read_bytes() for f in SOURCES) + _cpu_flags().encode() + isa.encode() + " ".join(FLAGS[isa]).encode()
                       + torch.__version__.encode() + sys.implementation.cache_tag.encode()).hexdigest()[:12]
    return build_dir() / f"bitmap_spmm_{isa}_{key}" / f"sparsellm_bitmap_spmm_{isa}_{key}.so"


def _compile(folder: str, name: str, isa: str) -> None:
    """The child process's work: compile (and import, as a check) the extension in `folder`. It stops the whole
    build (its session) when its parent dies, so a SIGKILLed or SIGTERMed caller leaves no compiler running."""
    import threading

    parent = os.getppid()

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        _kill_session(os.getsid(0))
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    from torch.utils.cpp_extension import load as cpp_load

    cpp_load(name=name, sources=[str(f) for f in SOURCES], build_directory=folder, verbose=False,
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
                                     start_new_session=True)  # its own session: Ctrl-C reaches only this process
            try:
                out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the build ran past {timeout:.0f} s ($SPARSELLM_KERNEL_BUILD_TIMEOUT)") from None
            finally:  # a time-out, Ctrl-C, pytest-timeout, or a child that died leaving ninja/g++ behind
                _kill_session(child.pid)
                if child.returncode is None:
                    child.communicate()
            if child.returncode != 0:
                raise RuntimeError(_why(out, child.returncode))
            with open(Path(tmp) / so.name, "rb") as f:
                os.fsync(f.fileno())  # a crash after the rename must not leave a truncated .so (SIGBUS on import)
            folder.mkdir(exist_ok=True)
            os.replace(Path(tmp) / so.name, so)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def load(isa: str | None = None):
    """The compiled extension module (functions spmm_expand, spmm_tiled, pack_bitmap, isa, lanes), or None where it
    cannot be built (one warning line says why). `isa`: None (the best this CPU has, -march=native) or
    "avx2" (AVX2 + FMA + F16C only); default from $SPARSELLM_KERNEL_ISA. Raises UsageError for another isa."""
    if os.environ.get("SPARSELLM_KERNELS", "").lower() == "pytorch":
        log.warning("sparsellm: SPARSELLM_KERNELS=pytorch: sparse linears use the pure-PyTorch CSR path (slow)")
        return None
    isa = isa or os.environ.get("SPARSELLM_KERNEL_ISA") or "native"
    if isa not in FLAGS:
        from ..errors import UsageError  # imported here: the build's child process runs this file as a script

        raise UsageError(f"SPARSELLM_KERNEL_ISA must be 'avx2' or unset, got {isa!r}")
    try:
        import torch  # noqa: F401  (the extension's symbols come from libtorch)

        so = cached_so(isa)
        name = so.stem
        if not so.exists():
            log.info(f"sparsellm: building the sparse kernels ({isa}) once, about 25 s; cached in {so.parent}")
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
