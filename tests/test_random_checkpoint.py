"""bench/make_random_checkpoint.py: the tiny shape, written in several shards, loads into a vanilla
LlamaForCausalLM with no missing or unexpected keys, its index matches the shard files, its values are as
documented, its forward is finite, and the same seed writes the same bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench/make_random_checkpoint.py"


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--out", str(out),
                           "--max_shard_size", "0.00005", *extra], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def test_loads_into_vanilla_llama_with_no_missing_or_unexpected_keys(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = ckpt
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    ids = tok("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    for dtype in (torch.bfloat16, torch.float32):
        with torch.no_grad():
            logits = model.to(dtype)(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert torch.isfinite(logits).all(), dtype


def test_index_covers_every_shard_exactly(ckpt):
    out, summary = ckpt
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = shard_files(out)
    assert len(files) == summary["shards"] > 2
    for k, f in enumerate(files, 1):
        assert f.name == f"model-{k:05d}-of-{len(files):05d}.safetensors"
    seen, total = {}, 0
    for f in files:
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for key in sf.keys():
                assert key not in seen, key
                seen[key] = f.name
                t = sf.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total == summary["bytes"]
    assert not [p for p in out.parent.iterdir() if p.name != "tiny"], "temporary directory left behind"


def test_values_are_normal_002_or_ones(ckpt):
    out, _ = ckpt
    first = {}
    for f in shard_files(out):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                assert t.dtype == torch.bfloat16
                if key.endswith("norm.weight"):
                    assert t.dim() == 1 and (t == 1).all(), key
                else:
                    t = t.float()
                    assert t.dim() == 2 and abs(t.std().item() - 0.02) < 0.001 and abs(t.mean().item()) < 0.001, key
                    first[key] = t.flatten()[:8]
    starts = [tuple(v.tolist()) for v in first.values()]
    assert len(set(starts)) == len(starts), "two tensors start with the same values: one generator for both?"


def test_same_seed_writes_identical_shards(ckpt, tmp_path):
    out, _ = ckpt
    proc = run(tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [(f.name, digest(f)) for f in shard_files(out)] == \
           [(f.name, digest(f)) for f in shard_files(tmp_path / "again")]
    assert (out / "model.safetensors.index.json").read_text() == \
           (tmp_path / "again/model.safetensors.index.json").read_text()


def test_non_empty_out_exits_2_with_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    proc = run(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an empty directory" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_7b_plan_keeps_each_block_in_one_shard_of_at_most_2gb():
    from transformers import LlamaConfig

    spec = importlib.util.spec_from_file_location("make_random_checkpoint", SCRIPT)
    mrc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mrc)
    cfg = LlamaConfig(**mrc.SHAPES["llama2-7b"], vocab_size=49152)
    groups = mrc.tensor_groups(cfg)
    mrc.check_against_meta_model(cfg, dict(item for g in groups for item in g))
    shards = mrc.plan_shards(groups, 2, int(2e9))
    where = {name: k for k, shard in enumerate(shards) for name, _ in shard}
    for n in range(32):
        assert len({k for name, k in where.items() if re.match(rf"model\.layers\.{n}\.", name)}) == 1, n
    sizes = [sum(2 * torch.Size(s).numel() for _, s in shard) for shard in shards]
    assert max(sizes) <= 2e9 and len(shards) == 9
    assert sum(sizes) == 2 * 6_878_924_800
