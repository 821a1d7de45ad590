"""`--device` and `--dtype`: what auto resolves to, and one-line errors for devices and dtypes that cannot
run. CUDA is simulated where the rule only reads torch.cuda's answers; the real CUDA path is in the
GPU-only tests."""

from __future__ import annotations

import pytest
import torch

from sparsellm.devices import check_device_spec, resolve_device, resolve_dtype
from sparsellm.errors import UsageError


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cpu:0", "CUDA", "", "cuda:1x"])
def test_malformed_devices_are_refused(spec):
    with pytest.raises(UsageError, match="--device must be"):
        check_device_spec(spec)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UsageError, match="no CUDA device is available"):
            resolve_device(spec)


def test_a_cuda_index_past_the_last_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="only 2 CUDA devices"):
        resolve_device("cuda:2")


def test_auto_dtype_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.float32  # no fast bf16 on this kind of CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cuda, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", cuda, "float32") == torch.bfloat16
    assert resolve_dtype("auto", cuda, None) == torch.bfloat16
    assert resolve_dtype("auto", cuda, "float16") == torch.float16  # a float16 checkpoint stays float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cuda, "bfloat16") == torch.float16  # a GPU without bf16


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    with pytest.raises(UsageError, match="V100 cannot run bfloat16"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))
    real = torch.Tensor.__matmul__

    def no_half(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore')
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_half)
    with pytest.raises(UsageError, match="--dtype float16 cannot run on cpu: \"addmm_impl_cpu_\" not implemented"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_cli_device_errors_are_one_line_before_any_work(tmp_path, capsys, saved_model_dir):
    from sparsellm.cli import main

    for argv in (["prune", "--model", str(saved_model_dir), "--device", "cuda", "--out", str(tmp_path / "o")],
                 ["eval", "ppl", "--model", str(saved_model_dir), "--device", "cuda:3"],
                 ["prune", "--model", str(saved_model_dir), "--device", "tpu", "--out", str(tmp_path / "o")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--device" in err, err
    assert not (tmp_path / "o").exists()
