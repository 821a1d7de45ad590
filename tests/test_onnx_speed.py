"""ONNX export for sparse CPU runtimes (prefill graph + static-shape KV-cache decode graph), the runtime runner,
and `sparsellm bench --deepsparse`'s guards. DeepSparse itself needs its own environment (numpy < 2), so the
runner is exercised here with onnxruntime, which runs the same graphs through the same code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_model
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.evaluate import sparse_runtime
from sparsellm.evaluate.onnx_export import check_exportable, export

EXPORTABLE = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": None})]


def _sparsify(model, ratio=0.6):
    """Zero the smallest |w| of every block linear, so the export carries exact zeros as a pruned model does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                k = int(p.numel() * ratio)
                p.view(-1)[p.abs().view(-1).argsort()[:k]] = 0
    return model


@pytest.mark.parametrize("family,overrides", EXPORTABLE)
def test_exported_prefill_and_kv_decode_match_pytorch(tmp_path, family, overrides):
    model = _sparsify(make_model(family, seed=3, initializer_range=0.5, **overrides))
    P, N = 7, 6
    info = export(model, tmp_path / "x", capacity=P + N)
    assert info["kv_shape"] == [1, 2, 2, P + N, 8]
    ids = torch.randint(10, 100, (1, P), generator=torch.Generator().manual_seed(0))
    spec = {"engine": "onnxruntime", "threads": 1, "models": {"m": str(tmp_path / "x")}, "prefill_lengths": [5],
            "decode_batches": [2], "decode_prompt": P, "new_tokens": N, "repeats": 1, "warmup": 0, "vocab": 128,
            "kv_shapes": {"m": info["kv_shape"]}, "check_ids": ids.tolist(), "return_step_logits": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, str(sparse_runtime.RUNNER), str(tmp_path / "spec.json"),
                        str(tmp_path / "out.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    greedy = out["greedy"]["m"]
    assert len(greedy) == N
    with torch.no_grad():  # reference: one full causal forward over prompt + the runtime's own continuation
        full = torch.cat([ids, torch.tensor([greedy])], 1)
        ref = model(full).logits[0]
    torch.testing.assert_close(torch.tensor(out["check_logits"]["m"]), ref[P - 1], atol=1e-4, rtol=1e-4)
    steps = torch.tensor(out["check_logits"]["m steps"])  # step i fed greedy[i] at position P + i
    torch.testing.assert_close(steps, ref[P:P + N], atol=1e-4, rtol=1e-4)
    assert greedy[1:] == ref[P:P + N - 1].argmax(-1).tolist()
    assert set(out["results"]["m"]) == {"prefill@5", "decode_b2"} and all(v > 0 for v in out["results"]["m"].values())


def test_compare_reports_ratios_and_checks_against_pytorch(tmp_path):
    dense = make_model("llama", seed=1, initializer_range=0.5)
    sparse = _sparsify(make_model("llama", seed=1, initializer_range=0.5))
    res = sparse_runtime.compare({"dense": dense, "model": sparse}, "onnxruntime", prefill_lengths=(8, 16),
                                 decode_batches=(1, 3), decode_prompt=6, new_tokens=3, repeats=1, warmup=0,
                                 threads=1, workdir=str(tmp_path), progress=False)
    assert set(res["results"]) == {"dense", "model"}
    assert set(res["ratios"]["model"]) == {"prefill@8", "prefill@16", "decode_b1", "decode_b3"}
    for k, v in res["ratios"]["model"].items():
        assert v == pytest.approx(res["results"]["model"][k] / res["results"]["dense"][k])
    for c in res["check"].values():
        assert c["max_abs_logit_diff"] < 1e-4 and c["greedy_agreement"] == 1.0
    assert list(tmp_path.iterdir()) == []  # the exports are removed


@pytest.mark.parametrize("family,overrides,match", [
    ("gemma3", {}, "supports llama"),
    ("opt", {}, "supports llama"),
    ("mistral", {"sliding_window": 8}, "sliding window of 8"),
])
def test_unsupported_exports_are_refused(tmp_path, family, overrides, match):
    model = make_model(family, **overrides)
    with pytest.raises(UsageError, match=match):
        export(model, tmp_path / "x", capacity=16)
    assert not (tmp_path / "x").exists()
    check_exportable(make_model("mistral", sliding_window=64), max_tokens=64)  # a window covering every length


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = make_model("llama", attn="sdpa").train()
    export(model, tmp_path / "x", capacity=8)
    assert model.config._attn_implementation == "sdpa" and model.training
    half = make_model("llama").to(torch.bfloat16)
    with pytest.raises(UsageError, match="float32"):
        export(half, tmp_path / "y", capacity=8)
    assert next(half.parameters()).dtype == torch.bfloat16 and not (tmp_path / "y").exists()


def test_per_block_widths_are_refused(tmp_path):
    from sparsellm.structured import importance, prune_structured

    model = make_model("llama")
    calib = torch.randint(3, 100, (2, 16))
    prune_structured(model, [0.0, 0.5], importance(model, calib, "wanda-sp", progress=False), gqa="group")
    with pytest.raises(UsageError, match="per-block attention widths"):
        export(model, tmp_path / "x", capacity=16)


def test_runner_imports_without_torch():
    """The runner runs in DeepSparse's own environment, which has no torch and no sparsellm."""
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(sparse_runtime.RUNNER.parent)!r}); "
            "import onnx_runner; print(onnx_runner.Engine.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "Engine", r.stderr


def test_missing_runtime_environment_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv(sparse_runtime.ENV_VAR, str(tmp_path / "nope" / "python"))
    with pytest.raises(UsageError, match="make deepsparse-env"):
        sparse_runtime.find_python("deepsparse")
    monkeypatch.setenv(sparse_runtime.ENV_VAR, sys.executable)  # exists, but has no deepsparse (numpy 2 here)
    with pytest.raises(UsageError, match="cannot import deepsparse.*make deepsparse-env"):
        sparse_runtime.find_python("deepsparse")
    with pytest.raises(UsageError, match="unknown sparse runtime"):
        sparse_runtime.find_python("tvm")


def test_cli_bench_deepsparse_without_its_environment(capsys, tmp_path, saved_model_dir, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the runtime environment was checked")

    monkeypatch.setattr("sparsellm.models.load_model", no_load)
    capsys.readouterr()
    assert main(["--quiet", "bench", "--model", str(saved_model_dir), "--baseline", str(saved_model_dir),
                 "--deepsparse", "--deepsparse_python", str(tmp_path / "missing"), "--save", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsellm: error:") and "make deepsparse-env" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_models_with_different_kv_shapes_and_a_full_context_cache(tmp_path):
    # e.g. a uniformly group-pruned model (saved with a vanilla config) against its dense baseline
    dense = make_model("llama", seed=2, initializer_range=0.5, max_position_embeddings=16)
    small = make_model("llama", seed=2, initializer_range=0.5, max_position_embeddings=16, num_key_value_heads=1)
    res = sparse_runtime.compare({"dense": dense, "model": small}, "onnxruntime", prefill_lengths=(16,),
                                 decode_batches=(2,), decode_prompt=12, new_tokens=4, repeats=1, warmup=0,
                                 threads=1, workdir=str(tmp_path), progress=False)  # 12 + 4 = the whole context
    assert all(c["ok"] and c["max_abs_logit_diff"] < 1e-4 for c in res["check"].values())
    assert set(res["ratios"]["model"]) == {"prefill@16", "decode_b2"}
    with pytest.raises(UsageError, match="exceed dense's context"):
        sparse_runtime.preflight({"dense": dense}, "onnxruntime", None, (8,), 12, 5)


def test_a_wrong_graph_is_caught_by_the_logits_check(tmp_path, monkeypatch):
    from sparsellm.evaluate import onnx_export

    real = onnx_export.export

    def export_then_change_the_model(model, *a, **k):  # the graph no longer computes the model
        info = real(model, *a, **k)
        with torch.no_grad():
            model.model.norm.weight.mul_(3)
        return info

    monkeypatch.setattr(onnx_export, "export", export_then_change_the_model)
    model = make_model("llama", seed=4, initializer_range=0.5)
    with pytest.raises(sparse_runtime.RuntimeCheckFailed, match="disagree") as e:
        sparse_runtime.compare({"m": model}, "onnxruntime", prefill_lengths=(8,), decode_batches=(1,),
                               decode_prompt=6, new_tokens=2, repeats=1, warmup=0, threads=1, progress=False)
    assert e.value.result["check"]["m"]["ok"] is False


def test_runner_failure_keeps_the_pytorch_results(capsys, tmp_path, saved_model_dir):
    fake = tmp_path / "fakepy"  # imports fine, then the runner dies as an out-of-memory kill would
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then exit 0; fi\necho 'MemoryError: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    capsys.readouterr()
    save = tmp_path / "s"
    assert main(["--quiet", "bench", "--model", str(saved_model_dir), "--baseline", str(saved_model_dir),
                 "--prefill", "8", "--decode_batches", "1", "--decode_prompt", "4", "--new_tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--no_bf16", "--deepsparse", "--deepsparse_python", str(fake),
                 "--save", str(save)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsellm: error:") and "boom" in err and len(err.strip().splitlines()) == 1, err
    sp = json.loads((save / "speed.json").read_text())
    assert set(sp["results"]) == {"dense fp32", "model fp32"} and "deepsparse" not in sp


@pytest.mark.parametrize("value", ["", "DIR", "FILE"])
def test_bad_runtime_python_paths(tmp_path, value):
    (tmp_path / "f").write_text("not a program")
    value = value.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "f"))
    with pytest.raises(UsageError, match="make deepsparse-env"):
        sparse_runtime.find_python("deepsparse", value)

