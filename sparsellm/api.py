"""The entry point of every method: a config in, the model changed in place, a report out.

    report = prune(model, tokenizer, PruneConfig(prune_method="wanda", sparsity_ratio=0.5))
    save_pruned(model, tokenizer, "out/", report)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .allocate import ALLOCATORS, allocate
from .data import calibration_windows
from .engine import auto_batch_size, linear_sparsity, prune_blocks
from .errors import UsageError
from .models import _umask, atomic_dir_write, block_linears, check_output_dir, context_length, get_blocks
from .prune import PRUNERS, check_sparsity, parse_pattern

log = logging.getLogger("sparsellm")


@dataclass
class PruneConfig:
    """Settings of one pruning run (names follow Wanda/SparseGPT).

    sparsity_ratio: target fraction of zeros in [0, 1); for N:M it is implied (1 − N/M) and may be None.
    sparsity_type: "unstructured" or "N:M" (keep N of every M weights along the input dimension).
    nsamples × seqlen: calibration windows drawn with `seed` from `calib_dataset` ("c4" or a local file).
    blocksize, percdamp: SparseGPT's column block size and Hessian dampening (fraction of mean diag).
    allocation: "uniform", "atp" (with `atp_beta`, ATP's common difference) or "file:PATH" (JSON rates).
    batch_size: calibration windows per block forward (None: about 8192 tokens per forward)."""

    prune_method: str = "wanda"
    sparsity_ratio: float | None = 0.5
    sparsity_type: str = "unstructured"
    nsamples: int = 128
    seqlen: int = 2048
    calib_dataset: str = "c4"
    seed: int = 0
    allocation: str = "uniform"
    atp_beta: float = 0.0
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "PruneConfig":
        """Check everything that does not need the model. Raises UsageError. Fills sparsity_ratio for N:M."""
        if self.prune_method not in PRUNERS:
            raise UsageError(f"unknown prune method {self.prune_method!r}; choose from {', '.join(PRUNERS)}")
        nm = parse_pattern(self.sparsity_type)
        if nm is not None:
            if self.sparsity_ratio is not None and abs(self.sparsity_ratio - nm.sparsity) > 1e-9:
                raise UsageError(f"--sparsity_ratio {self.sparsity_ratio} contradicts the {nm} pattern "
                                 f"(which is {nm.sparsity:g} sparse); leave it out for N:M")
            self.sparsity_ratio = nm.sparsity
        if self.sparsity_ratio is None:
            raise UsageError("--sparsity_ratio is required for unstructured sparsity")
        check_sparsity(self.sparsity_ratio)
        if self.allocation.startswith("file:"):
            if not Path(self.allocation[len("file:"):]).expanduser().is_file():
                raise UsageError(f"allocation file not found: {self.allocation[len('file:'):]}")
        elif self.allocation not in ALLOCATORS:
            raise UsageError(f"unknown allocation {self.allocation!r}; choose from "
                             f"{', '.join(ALLOCATORS)} or file:PATH")
        if self.atp_beta and self.allocation != "atp":
            raise UsageError("--atp_beta applies only to --allocation atp")
        if nm is not None and self.allocation != "uniform":
            raise UsageError("N:M patterns use uniform allocation")
        for name in ("nsamples", "seqlen", "blocksize", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < (2 if name == "seqlen" else 1):
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.percdamp < 1e6:
            raise UsageError(f"--percdamp must be > 0, got {self.percdamp}")
        return self

    @property
    def nm(self):
        return parse_pattern(self.sparsity_type)


def validate_for_model(model, config: PruneConfig) -> int:
    """Checks that need the model: architecture, N:M divisibility of every in_features, the allocation
    (β range, rates file length and mean). Returns the
    calibration seqlen, capped at the model's context length. Raises UsageError."""
    blocks = get_blocks(model)
    nm = config.nm
    for block in blocks:
        for name, lin in block_linears(model, block).items():
            if nm is not None and lin.in_features % nm.m:
                raise UsageError(f"{name}: in_features {lin.in_features} is not divisible by M = {nm.m} ({nm})")
    allocate(config.allocation, len(blocks), config.sparsity_ratio, atp_beta=config.atp_beta)  # fail before any work
    ctx = context_length(model)
    if config.seqlen > ctx:
        log.warning("seqlen %d exceeds the model's context %d; using %d", config.seqlen, ctx, ctx)
    return min(config.seqlen, ctx)


def versions() -> dict:
    import transformers

    return {"sparsellm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prune(model, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None = None,
          progress: bool = True) -> dict:
    """Prune the linears of every decoder block of `model` in place and return the run report.

    calib_ids: optional (nsamples, seqlen) token windows; drawn from config.calib_dataset when None.
    Raises UsageError for bad settings, an unsupported architecture or a too-short corpus; the model is
    untouched when it raises before pruning starts."""
    config.validate()
    seqlen = validate_for_model(model, config)
    if calib_ids is None:
        calib_ids = calibration_windows(tokenizer, config.calib_dataset, config.nsamples, seqlen, config.seed)
    num_blocks = len(get_blocks(model))
    rates = allocate(config.allocation, num_blocks, config.sparsity_ratio, atp_beta=config.atp_beta)
    t0 = time.perf_counter()
    blocks = prune_blocks(model, calib_ids, config.prune_method, rates, config.nm,
                          options={"blocksize": config.blocksize, "percdamp": config.percdamp},
                          batch_size=config.batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    return {
        "method": config.prune_method,
        "sparsity_type": config.sparsity_type,
        "target_sparsity": config.sparsity_ratio,
        "allocation": {"name": config.allocation, "rates": rates,
                       **({"atp_beta": config.atp_beta} if config.allocation == "atp" else {})},
        "calibration": {"dataset": config.calib_dataset, "nsamples": int(calib_ids.shape[0]),
                        "seqlen": int(calib_ids.shape[1]), "seed": config.seed,
                        "tokens_sha256": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
                        "used": PRUNERS[config.prune_method].STATS != "none"},
        "options": {"blocksize": config.blocksize, "percdamp": config.percdamp,
                    "batch_size": config.batch_size or auto_batch_size(int(calib_ids.shape[1]))},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "measured": linear_sparsity(model),
        "blocks": blocks,
        "prune_seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


def sparsity_sidecar(model, report: dict) -> dict:
    """The `sparsity_config.json` sidecar (llm-compressor's key names where they exist)."""
    prefix = _blocks_prefix(model)
    modules = {f"{prefix}.{b['block']}.{name}": m for b in report["blocks"] for name, m in b["modules"].items()}
    return {
        "format": "dense",
        "method": report["method"],
        "sparsity_structure": report["sparsity_type"],
        "global_sparsity": report["measured"]["sparsity"],
        "target_sparsity": report["target_sparsity"],
        "targets": sorted(modules),
        "ignore": ["embeddings", "lm_head", "norms"],
        "modules": modules,
        "allocation": report["allocation"],
        "calibration": report["calibration"],
        "versions": report["versions"],
    }


def _blocks_prefix(model) -> str:
    from .models import get_arch

    return get_arch(model).blocks


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pruned(model, tokenizer, out_dir, report: dict, run_report: dict | None = None, markdown: str = "",
                overwrite: bool = False) -> Path:
    """Write an HF directory (safetensors, exact zeros, tokenizer) plus `sparsity_config.json` (from the
    prune `report`), `report.json` (`run_report`, default `report`) and `report.md` atomically: a
    temporary directory renamed into place at the end, so a failure never leaves a partial model.
    Raises UsageError if `out_dir` overlaps the model's own directory, or is non-empty and not `overwrite`."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    out = check_output_dir(out_dir, overwrite, [source if str(source) and source.exists() else None])

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "sparsity_config.json", sparsity_sidecar(model, report))
        write_json_atomic(tmp / "report.json", run_report or report)
        write_text_atomic(tmp / "report.md", markdown)

    atomic_dir_write(out, write)
    return out


def config_dict(config: PruneConfig) -> dict:
    return asdict(config)
