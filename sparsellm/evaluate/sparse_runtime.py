"""Measured speed of exported models in a sparse CPU runtime: DeepSparse 1.8, the papers' CPU engine
(algorithms.md §10.3; measured notes in ../shared/docs/cpu-sparse-speed.md).

DeepSparse is deprecated: its last wheels need Python <= 3.11, onnx 1.14 and numpy < 2, so it runs in its own
environment (`make deepsparse-env` creates `.venv-deepsparse`), as a subprocess that runs `onnx_runner.py`.
This process exports every model (onnx_export.py: a prefill graph and a static-shape KV-cache decode graph),
hands the runner the same prompts settings as the PyTorch harness, and checks the runtime's logits against
PyTorch's on a fixed prompt, so a wrong export cannot pass as a fast one.

`onnxruntime` (dense kernels; it densifies sparse weights) is accepted as the engine too: the tests use it,
since DeepSparse cannot be installed next to this package's numpy 2.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import UsageError

RUNNER = Path(__file__).with_name("onnx_runner.py")
ENV_VAR = "SPARSELLM_DEEPSPARSE_PYTHON"
MAKE_HINT = ("create it with `make deepsparse-env` (a Python 3.11 venv with deepsparse==1.8.0, onnx 1.14, "
             f"numpy<2), or point {ENV_VAR} or --deepsparse_python at such a Python")


def find_python(engine: str, python: str | None = None) -> str:
    """The interpreter that runs `engine`: `python`, else $SPARSELLM_DEEPSPARSE_PYTHON, else
    .venv-deepsparse/bin/python in the working directory or next to this package's source tree (DeepSparse);
    this interpreter (onnxruntime). Raises UsageError, with the command that creates the environment, when
    the interpreter is missing or cannot import the runtime. A successful check is remembered."""
    return _find_python(engine, python, os.environ.get(ENV_VAR), os.getcwd())


@functools.cache  # a failure raises and is not cached; the key includes what the lookup reads
def _find_python(engine: str, python: str | None, _env: str | None, _cwd: str) -> str:
    if engine not in ("deepsparse", "onnxruntime"):
        raise UsageError(f"unknown sparse runtime {engine!r}: use deepsparse or onnxruntime")
    if python is None and engine == "deepsparse":
        python = os.environ.get(ENV_VAR)
        if not python:
            for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
                cand = root / ".venv-deepsparse" / "bin" / "python"
                if cand.exists():
                    python = str(cand)
                    break
        if not python:
            raise UsageError(f"the DeepSparse environment was not found: {MAKE_HINT}")
    if python is not None and not python.strip():
        raise UsageError(f"an empty path was given as the runtime's Python: {MAKE_HINT}")
    python = python or sys.executable
    found = shutil.which(python) if os.sep not in python else python  # a bare name is looked up on PATH
    if not found or not Path(found).is_file() or not os.access(found, os.X_OK):
        raise UsageError(f"{python} is not an executable Python interpreter: {MAKE_HINT}")
    python = found
    r = subprocess.run([python, "-c", f"import numpy, {engine}"], capture_output=True, text=True,
                       env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"{python} cannot import {engine} ({last}): {MAKE_HINT}")
    return python


def _check_ids(vocab: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(10, max(11, vocab - 1), (1, length), generator=g)


CHECK_ATOL = 1e-2  # fp32 exports agree with PyTorch to ~1e-4 on SmolLM2; a wrong graph is off by O(1)


class RuntimeCheckFailed(UsageError):
    """The runtime's logits disagree with PyTorch's: the export is wrong, so its speed means nothing."""


@torch.no_grad()
def greedy_tokens(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Plain argmax continuation of `ids` (1, P), one full forward per token: no generation_config, no EOS
    stop, no repetition penalty, exactly what the runner decodes."""
    out = []
    for _ in range(new_tokens):
        nxt = model(ids, use_cache=False).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


def preflight(models: dict, engine: str, python: str | None, prefill_lengths, decode_prompt: int,
              new_tokens: int) -> str:
    """Every check that can fail before any timing: the runtime's Python, the onnx exporter, each model's
    architecture, and a decode cache within every model's context. Returns the runtime's Python."""
    python = find_python(engine, python)
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise UsageError("the ONNX exporter needs the onnx package: pip install -e '.[onnx]' (make venv installs it)")
    from .onnx_export import check_exportable

    for name, m in models.items():
        ctx = getattr(m.config, "max_position_embeddings", None)
        if ctx and decode_prompt + new_tokens > ctx:
            raise UsageError(f"--decode_prompt {decode_prompt} + --new_tokens {new_tokens} exceed {name}'s context "
                             f"({ctx}): the runtime's KV cache holds them all")
        check_exportable(m, max([L for L in prefill_lengths if not ctx or L <= ctx] + [decode_prompt + new_tokens]))
    return python


@torch.no_grad()
def compare(models: dict, engine: str = "deepsparse", python: str | None = None, prefill_lengths=(128, 512, 2048),
            decode_batches=(1, 8), decode_prompt: int = 128, new_tokens: int = 32, repeats: int = 5, warmup: int = 1,
            threads: int | None = None, workdir: str | None = None, progress: bool = True) -> dict:
    """Throughput of every model in `models` ({name: float32 model}; the first is the baseline) in `engine`, on
    identical prompts. Same settings and result shape as speed.compare (prefill@L and decode_b{B} in tokens/s,
    medians of `repeats` after `warmup`), plus "check": per model, the largest |logit difference| between the
    runtime and PyTorch on a fixed prompt of `decode_prompt` tokens, and the fraction of the `new_tokens`
    argmax tokens on which the two agree (they may part after a near-tie).
    Raises UsageError for a missing runtime environment, an unsupported architecture or a decode cache beyond
    the context (all before any timing); RuntimeError when the runner fails; RuntimeCheckFailed (with the
    results attached as .result) when a model's logits differ from PyTorch's by more than CHECK_ATOL."""
    from .onnx_export import export

    python = preflight(models, engine, python, prefill_lengths, decode_prompt, new_tokens)
    threads = threads or torch.get_num_threads()
    first = next(iter(models.values()))
    ctx = getattr(first.config, "max_position_embeddings", 2048) or 2048
    lengths = [L for L in prefill_lengths if L <= ctx]
    capacity = decode_prompt + new_tokens
    check = _check_ids(first.config.vocab_size, decode_prompt)  # shares the engines of prefill@P and decode_b1
    with tempfile.TemporaryDirectory(dir=workdir, prefix="sparsellm-onnx-") as tmp:
        dirs, kvs = {}, {}
        for i, (name, m) in enumerate(models.items()):
            info = export(m, Path(tmp) / f"m{i}", capacity, max(lengths, default=0))
            dirs[name], kvs[name] = str(Path(tmp) / f"m{i}"), info["kv_shape"]
        spec = {"engine": engine, "threads": threads, "models": dirs, "prefill_lengths": lengths,
                "decode_batches": list(decode_batches), "decode_prompt": decode_prompt, "new_tokens": new_tokens,
                "repeats": repeats, "warmup": warmup, "vocab": first.config.vocab_size, "kv_shapes": kvs,
                "check_ids": check.tolist()}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run([python, str(RUNNER), str(Path(tmp) / "spec.json"), str(Path(tmp) / "out.json")],
                           env=env, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else \
                f"killed by signal {-r.returncode} (out of memory?)" if r.returncode < 0 else "no message"
            raise RuntimeError(f"the {engine} runner failed (exit {r.returncode}): {why}")
        out = json.loads((Path(tmp) / "out.json").read_text())
    checks = {}
    for name, m in models.items():
        ref = m(check).logits[0, -1]
        greedy = greedy_tokens(m, check, new_tokens)
        checks[name] = {"max_abs_logit_diff": (torch.tensor(out["check_logits"][name]) - ref).abs().max().item(),
                        "greedy_agreement": sum(a == b for a, b in zip(greedy, out["greedy"][name])) / len(greedy)}
        checks[name]["ok"] = checks[name]["max_abs_logit_diff"] <= CHECK_ATOL
    res = out["results"]
    names = list(models)
    base = res[names[0]]
    result = {"engine": engine, "threads": threads, "results": res,
              "ratios": {n: {k: v / base[k] for k, v in res[n].items()} for n in names[1:]},
              "check": checks, "compile_seconds": out["compile_seconds"], "versions": out["versions"],
              "settings": {"prefill_lengths": [f"prefill@{L}" for L in lengths], "decode_prompt": decode_prompt,
                           "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "baseline": names[0],
                           "decode": "static-shape KV cache of decode_prompt + new_tokens slots (onnx_export.py)"}}
    bad = [f"{n} (max |Δlogit| {c['max_abs_logit_diff']:.3g})" for n, c in checks.items() if not c["ok"]]
    if bad:
        err = RuntimeCheckFailed(f"{engine}'s logits disagree with PyTorch's beyond {CHECK_ATOL}: {', '.join(bad)}; "
                                 "the exported graph is wrong, so its timings are not reported as speed-ups")
        err.result = result
        raise err
    return result
