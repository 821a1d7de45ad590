"""Nothing lost, nothing silent when saving (issue 20): a structurally pruned GQA model is always saved (a plain
config where transformers can express it, structure.json alone otherwise) and a failed save leaves the search
resumable; adapters left attached are refused and a checkpoint missing weights is not loaded at random; every
output file has the umask's mode; weights are saved in the dtype asked for, zeros exact."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config, make_model
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.models import load_model
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.runs.rundir import save_pruned
from sparsellm.structured import importance, prune_structured
from sparsellm.structured.io import write_structured

# Llama-3-8B's ratio of heads to width: head_dim 8, 32 query heads sharing 8 KV heads (G = 4)
GQA = dict(hidden_size=256, num_attention_heads=32, num_key_value_heads=8, intermediate_size=64)


def _calib(n=2, seqlen=16):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _expressible(family: str, n_q: int, inter: int) -> bool:
    """Independent of sparsellm: does the family's own config class accept these widths with head_dim 8?"""
    d = {**make_config(family, **GQA).to_dict(), "num_attention_heads": n_q, "head_dim": 8,
         "intermediate_size": inter}
    try:
        type(make_config(family)).from_dict(d)
        return True
    except Exception:  # noqa: BLE001  transformers' validation error, whatever its class
        return False


# ------------------------------------------------------------------ item 17: modes follow the umask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_output_of_a_prune_run_follows_the_umask(tmp_path, saved_model_dir, calib_txt, mask):
    out, reports = tmp_path / "deep" / "out", tmp_path / "reports"
    old = os.umask(mask)
    try:
        code = main(["--quiet", "prune", "--model", str(saved_model_dir), "--prune_method", "wanda",
                     "--calib_dataset", str(calib_txt), "--nsamples", "2", "--seqlen", "16", "--diag_nsamples", "1",
                     "--eval", "none", "--out", str(out), "--save", str(reports)])
    finally:
        os.umask(old)
    assert code == 0
    paths = [out, out.parent, reports, *out.rglob("*"), *reports.rglob("*")]
    assert {"model.safetensors", "config.json", "errors.png", "report.json"} <= {p.name for p in paths}
    assert (reports / "errors.png").is_file()
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
