"""Start-up is fast: `--help`, a flag error and a bare subcommand (which prints its usage) answer without
importing torch, transformers, numpy or scipy. Checked in a fresh interpreter, after each command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "numpy", "scipy")
SUBCOMMANDS = (["prune"], ["allocate"], ["finetune"], ["search"], ["bench"], ["report"], ["plot-errors"],
               ["eval"], ["eval", "ppl"], ["eval", "zeroshot"], ["demo"])
ARGVS = [["--help"], []] + [s + ["--help"] for s in SUBCOMMANDS] + [s + ["--bogus"] for s in SUBCOMMANDS] + [
    ["prune"], ["allocate"], ["prune", "--model", "m", "--percdamp", "nan"],
    ["prune", "--model", "m", "--sparsity_ratio", "inf"], ["finetune", "--model", "m", "--lr", "nan"],
    ["search", "--model", "m", "--nsamples", "x"]]

SCRIPT = """
import contextlib, io, json, sys
from sparsellm.cli import main
heavy, out = {heavy}, []
for argv in {argvs}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    out.append([argv, code, [m for m in heavy if m in sys.modules]])
print(json.dumps(out))
"""


def test_help_and_flag_errors_import_no_heavy_library():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY, argvs=ARGVS)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == len(ARGVS)
    for argv, code, loaded in results:
        assert loaded == [], f"sparsellm {' '.join(argv)} imported {loaded}"
        assert code == (0 if "--help" in argv else 2), (argv, code)


def test_lazy_stand_ins_behave_like_the_modules():
    import torch

    from sparsellm.lazy import LazyModule, lazy_import, no_grad

    assert lazy_import("torch") is torch  # already imported: the module itself
    lazy = LazyModule("torch")
    assert lazy.float32 is torch.float32 and lazy.nn.Linear is torch.nn.Linear and lazy.zeros(2).tolist() == [0, 0]

    @no_grad
    def f(x):
        return torch.is_grad_enabled(), x * 2

    @no_grad
    def g():
        yield torch.is_grad_enabled()

    x = torch.ones(2, requires_grad=True)
    enabled, y = f(x)
    assert not enabled and not y.requires_grad and f.__name__ == "f"
    assert list(g()) == [False] and torch.is_grad_enabled()
