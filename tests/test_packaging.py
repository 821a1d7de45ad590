"""Every file the package needs at run time ships in a wheel: each non-Python file under sparsellm/ must match a
pattern of pyproject's [tool.setuptools.package-data] (the kernels' C++ sources were once left out, so an installed
wheel could only run the slow fallback)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shipped(rel: Path, package_data: dict) -> bool:
    for pkg, patterns in package_data.items():
        base = Path(*pkg.split("."))
        if base in rel.parents:
            inner = rel.relative_to(base).as_posix()
            if any(fnmatch.fnmatchcase(inner, p) and inner.count("/") == p.count("/") for p in patterns):
                return True
    return False


def test_every_data_file_of_the_package_is_in_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p.relative_to(ROOT) for p in (ROOT / "sparsellm").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc", ".so")]
    assert any(f.suffix == ".cpp" for f in files)
    missing = [str(f) for f in files if not _shipped(f, package_data)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
