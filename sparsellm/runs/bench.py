"""`run_bench`: measured inference speed of a model against its dense baseline in one process (what
`sparsellm bench` does), optionally also in DeepSparse; config in, record out (`details["speed"]`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import check_finite, positive_ints, setting
from ..errors import UsageError
from ..outputs import write_json_atomic
from .generate import VALUES, VALUES_HELP
from .record import Run
from .rundir import RunDir

KERNELS = ("dense", "sparse", "semi24")


@dataclass
class BenchRun:
    """Prefill tokens/s at each `prefill` length and KV-cache decode tokens/s at each of `decode_batches`,
    for the model and its dense `baseline` (None: the model recorded in the run's report.json), in fp32
    and (unless `no_bf16`) bf16: the median of `repeats` runs after `warmup`, in alternation."""

    model: str = setting(None, "the (pruned) model: directory, hub id, .gguf or preset")
    baseline: str | None = setting(None, "the dense model (default: the 'model' recorded in the pruned model's "
                                         "report.json)")
    threads: int | None = setting(None, "torch threads (default: torch's choice)")
    prefill: str = setting("128,512,2048", "prefill lengths in tokens")
    decode_batches: str = setting("1,8", "batch sizes of the KV-cache decode loop")
    decode_prompt: int = setting(128, "prompt tokens before the timed decode steps")
    new_tokens: int = setting(32, "decode steps timed per run")
    repeats: int = setting(5, "timed runs per measurement (median reported)")
    warmup: int = setting(1, "untimed runs first")
    no_bf16: bool = setting(False, "skip the bfloat16 runs")
    kernels: str = setting("dense", "sparse: also run the model with its pruned linears in sparsellm's CPU sparse "
                                    "kernels (values in --values; sparsellm.kernels); semi24: also run it with its "
                                    "2:4 linears in PyTorch's semi-structured kernels (CUDA, --backend), in the "
                                    "same alternation", choices=KERNELS)
    values: str = setting("float16", VALUES_HELP, choices=VALUES)
    device: str = setting("cpu", "cpu, or cuda / cuda:N / auto: on a GPU every model runs in bfloat16, dense "
                                 "bf16 the baseline (no fp32 runs)")
    backend: str = setting("auto", "the 2:4 kernels of --kernels semi24: cusparselt, cutlass (compute capability "
                                   "8.x only), or auto (cusparselt where torch has it)",
                           choices=("auto", "cutlass", "cusparselt"))
    cuda_graphs: bool = setting(False, "GPU only: capture every prefill and decode step once in a CUDA graph and "
                                       "replay it (decode from a static KV cache), as serving engines do; eager "
                                       "PyTorch pays each kernel's launch and dispatch on the host")
    deepsparse: bool = setting(False, "also run both models, exported to ONNX, in DeepSparse 1.8 (needs "
                                      "`make deepsparse-env`)")
    deepsparse_python: str | None = setting(None, "the Python of the DeepSparse environment (default: "
                                                  "$SPARSELLM_DEEPSPARSE_PYTHON, else .venv-deepsparse/bin/python)")
    save: str | None = setting(None, "directory to write speed.json into (e.g. the run directory)")

    def validate(self) -> "BenchRun":
        check_finite(self)
        positive_ints(self.prefill, "--prefill")
        positive_ints(self.decode_batches, "--decode_batches")
        if self.kernels not in KERNELS:
            raise UsageError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        from ..devices import resolve_device

        device = resolve_device(self.device)  # UsageError for a bad spec, or CUDA where there is none
        cuda = device.type == "cuda"
        if self.kernels == "semi24":
            if not cuda:
                raise UsageError("--kernels semi24 runs on a GPU: add --device cuda")
            from ..kernels.semi24 import check_available

            check_available(self.backend, device)
        if cuda and (self.no_bf16 or self.values != "float16"):
            raise UsageError("on a GPU every run is bfloat16 and --values / --no_bf16 do not apply; drop them")
        if self.cuda_graphs and not cuda:
            raise UsageError("--cuda_graphs needs a GPU: add --device cuda")
        if self.kernels == "sparse" and cuda:
            raise UsageError("--kernels sparse are CPU kernels: use --device cpu (or --kernels semi24 on a GPU)")
        if cuda and self.deepsparse:
            raise UsageError("--deepsparse runs on the CPU: use --device cpu")
        if self.values not in VALUES:
            raise UsageError(f"--values must be one of {', '.join(VALUES)}, got {self.values!r}")
        if self.repeats < 1 or self.warmup < 0 or self.new_tokens < 1 or self.decode_prompt < 1:
            raise UsageError("--repeats, --new_tokens and --decode_prompt must be >= 1 and --warmup >= 0")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1):
            raise UsageError(f"--threads must be between 1 and this machine's {os.cpu_count()} CPUs, "
                             f"got {self.threads}")
        return self


def _baseline(cfg: BenchRun) -> str:
    """The dense model: --baseline, or the model recorded in report.json next to --model."""
    from ..models import PRESETS, resolve_model

    if cfg.baseline is not None:
        resolve_model(cfg.baseline)
        return cfg.baseline
    _, src = resolve_model(cfg.model)
    rep = Path(src) / "report.json" if src is not None and Path(src).is_dir() else None
    if rep is None or not rep.is_file():
        raise UsageError("give the dense model with --baseline (no report.json next to --model names it)")
    recorded = json.loads(rep.read_text())
    baseline, path = recorded.get("model"), recorded.get("model_path")
    if baseline not in PRESETS and path and Path(path).exists():
        baseline = path  # the dense model as resolved when the run was made, not relative to today's cwd
    if not baseline:
        raise UsageError("give the dense model with --baseline")
    resolve_model(baseline)
    return baseline


def run_bench(cfg: BenchRun, progress: bool = True) -> Run:
    """Measure, write speed.json into `cfg.save` if given, and return the record (`details["speed"]`).
    A DeepSparse failure still leaves the PyTorch results in speed.json, and raises UsageError."""
    import torch

    from ..evaluate.speed import compare, ratio_spread
    from ..models import load_model

    cfg.validate()
    prefill, batches = positive_ints(cfg.prefill, "--prefill"), positive_ints(cfg.decode_batches, "--decode_batches")
    baseline = _baseline(cfg)
    save = RunDir.prepare(cfg.save, [], replaces=False)  # only speed.json is added, e.g. to the run dir
    if cfg.deepsparse:  # a missing runtime environment is reported before any model loads
        from ..evaluate.sparse_runtime import find_python

        find_python("deepsparse", cfg.deepsparse_python)
    from ..devices import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        return _run_cuda(cfg, device, baseline, prefill, batches, save, progress)
    dense, _, _ = load_model(baseline, torch.float32)
    sparse, _, _ = load_model(cfg.model, torch.float32)
    if cfg.deepsparse:  # every other DeepSparse check, before the long PyTorch runs
        from ..evaluate.sparse_runtime import preflight

        preflight({"dense": dense, "model": sparse}, "deepsparse", cfg.deepsparse_python, prefill,
                  cfg.decode_prompt, cfg.new_tokens)
    models = {"dense fp32": dense, "model fp32": sparse}
    swap = None
    if cfg.kernels == "sparse":
        from ..kernels import sparsify

        kernel_model = load_model(cfg.model, torch.float32)[0]
        swap = sparsify(kernel_model, min_sparsity=0.3, dtype=getattr(torch, cfg.values))
        models["model sparse kernels"] = kernel_model
    if not cfg.no_bf16:
        models["dense bf16"] = load_model(baseline, torch.bfloat16)[0]
        models["model bf16"] = load_model(cfg.model, torch.bfloat16)[0]
    timing = dict(decode_prompt=cfg.decode_prompt, new_tokens=cfg.new_tokens, repeats=cfg.repeats, warmup=cfg.warmup)
    res = compare(models, prefill, batches, threads=cfg.threads, progress=progress, **timing)
    res.update(model=cfg.model, baseline=baseline)
    if swap is not None:
        res["sparse_kernels"] = {k: v for k, v in swap.items() if k != "skipped"}
    record = Run("bench", cfg.model, None, vars(cfg), details={"speed": res})
    res["versions"] = record.versions
    if cfg.deepsparse:
        _deepsparse(cfg, res, dense, sparse, prefill, batches, timing, save, progress)
    if "dense bf16" in res["results"]:  # the second baseline, measured in this same run
        b16 = res["results"]["dense bf16"]
        res["ratios_vs_dense_bf16"] = {n: {k: r[k] / b16[k] for k in b16 if k in r}
                                       for n, r in res["results"].items() if n != "dense bf16"}
        sec = res["seconds"]
        res["ratio_spread_vs_dense_bf16"] = {n: {k: ratio_spread(sec["dense bf16"][k], sec[n][k]) for k in sec[n]}
                                             for n in sec if n != "dense bf16"}
    if save is not None:
        write_json_atomic(save.path / "speed.json", res)
    return record.finish()


def _run_cuda(cfg: BenchRun, device, baseline: str, prefill, batches, save, progress) -> Run:
    """The GPU bench: dense bf16 (the baseline), the model in bf16, and (--kernels semi24) the model with its
    2:4 linears in `torch.sparse.to_sparse_semi_structured` (--backend), all on the CUDA `device`."""
    import torch

    from ..devices import describe
    from ..evaluate.speed import compare
    from ..kernels import sparsify
    from ..models import load_model

    models = {"dense bf16": load_model(baseline, torch.bfloat16)[0].to(device).eval(),
              "model bf16": load_model(cfg.model, torch.bfloat16)[0].to(device).eval()}
    swap = None
    if cfg.kernels == "semi24":
        semi = load_model(cfg.model, torch.bfloat16)[0].to(device).eval()
        swap = sparsify(semi, min_sparsity=0.3, kernels="semi24", backend=cfg.backend)
        models[f"model 2:4 {swap['isa']}"] = semi
    timing = dict(decode_prompt=cfg.decode_prompt, new_tokens=cfg.new_tokens, repeats=cfg.repeats, warmup=cfg.warmup)
    res = compare(models, prefill, batches, threads=cfg.threads, progress=progress, cuda_graphs=cfg.cuda_graphs,
                  **timing)
    res.update(model=cfg.model, baseline=baseline, device=describe(device))
    if swap is not None:
        res["sparse_kernels"] = {k: v for k, v in swap.items() if k != "skipped"}
    record = Run("bench", cfg.model, None, vars(cfg), details={"speed": res})
    res["versions"] = record.versions
    if save is not None:
        write_json_atomic(save.path / "speed.json", res)
    return record.finish()


def _deepsparse(cfg, res, dense, sparse, prefill, batches, timing, save, progress) -> None:
    """Add DeepSparse's rows to `res` (ratios against PyTorch dense fp32 of this same bench run)."""
    import torch

    from ..evaluate import sparse_runtime

    if save is not None:  # the PyTorch results survive a DeepSparse failure
        write_json_atomic(save.path / "speed.json", res)
    kept = f"; the PyTorch results are in {save.path / 'speed.json'}" if save is not None else ""
    try:
        ds = sparse_runtime.compare({"dense": dense, "model": sparse}, "deepsparse", cfg.deepsparse_python,
                                    prefill, batches, threads=cfg.threads or torch.get_num_threads(),
                                    progress=progress, **timing)
    except sparse_runtime.RuntimeCheckFailed as e:
        if save is not None:
            write_json_atomic(save.path / "speed.json", {**res, "deepsparse_failed_check": e.result})
        raise UsageError(f"{e}{kept}") from None
    except RuntimeError as e:
        raise UsageError(f"{e}{kept}") from None
    res["deepsparse"] = ds
    base = res["results"]["dense fp32"]
    for n in ("dense", "model"):
        r = ds["results"][n]
        res["results"][f"deepsparse {n}"] = r
        res["ratios"][f"deepsparse {n}"] = {k: v / base[k] for k, v in r.items() if k in base}
