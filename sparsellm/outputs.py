"""Everything that writes outputs: output-directory checks, atomic file and directory writes.

Nothing else in sparsellm creates an output file or directory directly: a file is written to a temporary
file in the same directory and renamed; a directory is written to a temporary directory next to it and
swapped into place with SIGINT/SIGTERM held, so an interrupted run leaves either the old or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import UsageError

def check_output_dir(out: str | Path, overwrite: bool, inputs: list[Path | None], replaces: bool = True) -> Path:
    """Validate an output directory before any work. It must not be an input or lie inside an input
    directory; when it `replaces` (a model directory swapped in whole) it must not contain an input either,
    since --overwrite would delete it. It must be empty unless `overwrite`; its nearest existing ancestor
    must be a writable directory. Raises UsageError."""
    if not str(out).strip():
        raise UsageError("output directory is an empty string")
    out = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp).expanduser().resolve()
        inside_input = inp.is_dir() and inp in out.parents
        if out == inp or inside_input or (replaces and out in inp.parents):
            raise UsageError(f"refusing to write to {out}: it overlaps the input {inp}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output directory {out} is not empty (pass --overwrite, or overwrite=True in Python, to replace it)")
    anc = out
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK):
        raise UsageError(f"cannot create {out}: {anc} is not a writable directory")
    return out


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM while a directory swap completes, so it is all or nothing."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if main else None
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def umask() -> int:
    """This process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a directory and everything under it) the modes a plain `open` / `mkdir`
    would: files 0666 & ~umask, directories 0777 & ~umask. Libraries that write through temporary files
    (safetensors' writer, `mkstemp`) leave 0600 otherwise. Symbolic links are left alone."""
    mask = umask()
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if name in dirs else 0o666) & ~mask)


def atomic_dir_write(out: Path, write_fn) -> None:
    """Call `write_fn(tmp_dir)` on a fresh temporary directory next to `out`, then swap it into place
    (signals held during the swap). On any failure or interrupt before the swap, the temporary directory
    is removed and `out` is left as it was. Every file and directory in it gets the umask's modes
    (`apply_umask`), as if written directly."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_fn(tmp)
        apply_umask(tmp)  # mkdtemp makes it 0700, safetensors' files are 0600
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
