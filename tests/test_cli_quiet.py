"""`--quiet` is quiet: with zero-shot evaluation (lm-eval) run outside a git repository, nothing reaches the
terminal but the results and the line that says where the model was saved. Run in a fresh interpreter so
that what lm-eval, datasets and `git` write to the real stderr is seen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import require


def test_quiet_zeroshot_run_prints_only_results_and_where_it_saved(tmp_path, saved_model_dir, calib_txt):
    require("lm_eval")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    argv = ["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt), "--nsamples", "2",
            "--seqlen", "16", "--eval", "zeroshot", "--tasks", "rte", "--limit", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root), "SPARSELLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "sparsellm", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    limit_warning = [ln for ln in lines if ln.startswith("sparsellm: warning: --limit 2 leaves the standard error")]
    assert len(limit_warning) == 1, proc.stderr  # warnings are not hidden by --quiet (2 documents: a wide error)
    assert lines == limit_warning + [f"saved pruned model to {out}"], proc.stderr  # before: lm-eval's bars and warnings, git's
    assert "| rte |" in proc.stdout                                 # "fatal: not a git repository", no saved line
