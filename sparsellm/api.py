"""The entry point of every method: a config in, the model changed in place, a report out.

    report = prune(model, tokenizer, PruneConfig(prune_method="wanda", sparsity_ratio=0.5))
    save_pruned(model, tokenizer, "out/", report)
"""

from __future__ import annotations

import hashlib
import logging
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .allocate import ALLOCATORS, allocate, check_rates, owl, rmi
from .data import calibration_windows
from .engine import auto_batch_size, dense_walk, linear_sparsity, prune_blocks
from .errors import UsageError
from .models import block_linears, context_length, get_blocks
from .outputs import atomic_dir_write, check_output_dir, write_json_atomic, write_text_atomic
from .prune import PRUNERS, check_sparsity, parse_pattern, wanda

log = logging.getLogger("sparsellm")


@dataclass
class PruneConfig:
    """Settings of one pruning run (names follow Wanda/SparseGPT).

    sparsity_ratio: target fraction of zeros in [0, 1); for N:M it is implied (1 − N/M) and may be None.
    sparsity_type: "unstructured" or "N:M" (keep N of every M weights along the input dimension).
    nsamples × seqlen: calibration windows drawn with `seed` from `calib_dataset` ("c4" or a local file).
    blocksize, percdamp: SparseGPT's column block size and Hessian dampening (fraction of mean diag).
    allocation: "uniform", "atp" (with `atp_beta`, ATP's common difference), "owl" (outlier ratio
        threshold `owl_m` = M, spread `owl_lambda` = λ, `owl_granularity` "block" or "layer"), "rmi"
        (LoSA's representation mutual information from `rmi_nsamples` windows, `rmi_beta`, bound
        `rmi_delta`; None: the reference values) or "file:PATH" (JSON rates, whose mean must be the
        target within 1e-6 unless `allow_mean_mismatch`).
    batch_size: calibration windows per block forward (None: about 2048 tokens per forward, at least one window).
    diag_nsamples: windows also run through the dense blocks for the cumulative reconstruction error
        (None: 8 for Wanda/SparseGPT, 0 for magnitude; 0 turns it off)."""

    prune_method: str = "wanda"
    sparsity_ratio: float | None = 0.5
    sparsity_type: str = "unstructured"
    nsamples: int = 128
    seqlen: int = 2048
    calib_dataset: str = "c4"
    seed: int = 0
    allocation: str = "uniform"
    atp_beta: float = 0.0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    owl_granularity: str = "block"
    rmi_nsamples: int = 64
    rmi_beta: float | None = None
    rmi_delta: float | None = None
    diag_nsamples: int | None = None
    allow_mean_mismatch: bool = False
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
        if self.allow_mean_mismatch and not self.allocation.startswith("file:"):
            raise UsageError("--allow_mean_mismatch applies only to --allocation file:PATH")
        if self.atp_beta and self.allocation != "atp":
            raise UsageError("--atp_beta applies only to --allocation atp")
        if self.allocation != "owl" and (self.owl_m, self.owl_lambda, self.owl_granularity) != (5.0, 0.08, "block"):
            raise UsageError("--owl_m, --owl_lambda and --owl_granularity apply only to --allocation owl")
        if self.allocation != "rmi" and (self.rmi_nsamples, self.rmi_beta, self.rmi_delta) != (64, None, None):
            raise UsageError("--rmi_nsamples, --rmi_beta and --rmi_delta apply only to --allocation rmi")
        if self.owl_granularity not in ("block", "layer"):
            raise UsageError(f"--owl_granularity must be block or layer, got {self.owl_granularity!r}")
        if not self.owl_m > 0:
            raise UsageError(f"--owl_m must be > 0, got {self.owl_m}")
        if self.allocation == "owl":
            owl.check_lambda(self.sparsity_ratio, self.owl_lambda)
        if self.allocation == "rmi":
            rmi.check_delta(self.sparsity_ratio, self.rmi_delta)
        if self.diag_nsamples is not None and self.diag_nsamples < 0:
            raise UsageError(f"--diag_nsamples must be >= 0, got {self.diag_nsamples}")
        if nm is not None and self.allocation != "uniform":
            raise UsageError("N:M patterns use uniform allocation")
        for name in ("nsamples", "seqlen", "blocksize", "batch_size", "rmi_nsamples"):
            least = 2 if name == "seqlen" else 1
            if getattr(self, name) is not None and int(getattr(self, name)) < least:
                raise UsageError(f"--{name} must be >= {least}, got {getattr(self, name)}")
        if not 0 < self.percdamp < 1e6:
            raise UsageError(f"--percdamp must be > 0, got {self.percdamp}")
        return self

    @property
    def nm(self):
        return parse_pattern(self.sparsity_type)

    @property
    def diag(self) -> int:
        if self.diag_nsamples is not None:
            return min(self.diag_nsamples, self.nsamples)
        return 0 if self.prune_method == "magnitude" else min(8, self.nsamples)


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
    if config.allocation not in DATA_ALLOCATORS:
        allocate(config.allocation, len(blocks), config.sparsity_ratio, atp_beta=config.atp_beta,
                 mean_tolerance=None if config.allow_mean_mismatch else 1e-6)  # fail early
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


DATA_ALLOCATORS = ("owl", "rmi")  # need a dense pre-pass over calibration data


@torch.no_grad()
def resolve_allocation(model, config: PruneConfig, calib_ids: torch.Tensor, progress: bool = True) -> tuple[list, dict]:
    """Per-block rates for `config.allocation` and the report entry describing them.

    OWL and RMI first walk the dense model over the calibration windows (algorithms.md §6, §8.2):
    OWL takes every block's (or linear's) outlier ratio of its Wanda scores |W|·‖X‖; RMI streams one
    (n, n) Gram matrix of block inputs per block over the first `rmi_nsamples` windows. Returns
    (rates, info): rates[i] is a float, or for OWL's layer granularity a dict {linear name: rate};
    info has the name, the per-block rates (parameter-weighted for dicts), the statistics used and
    `seconds`. Raises UsageError for invalid rates."""
    t0 = time.perf_counter()
    blocks = get_blocks(model)
    L, S = len(blocks), config.sparsity_ratio
    info: dict = {"name": config.allocation}
    if config.allocation == "owl":
        units, weights, names = [], [], []
        for i, block, _, stats in dense_walk(model, calib_ids, need="norm", batch_size=config.batch_size,
                                             progress=progress):
            linears = block_linears(model, block)
            scores = {n: wanda.scores(lin.weight.float(), stats[n]) for n, lin in linears.items()}
            if config.owl_granularity == "block":
                units.append(owl.outlier_ratio(list(scores.values()), config.owl_m))
            else:
                for n, sc in scores.items():
                    units.append(owl.outlier_ratio(sc, config.owl_m))
                    weights.append(sc.numel())
                    names.append((i, n))
        flat = owl.rates_from_lod(units, S, config.owl_lambda, weights or None)
        if config.owl_granularity == "block":
            rates = flat
        else:
            rates = [{} for _ in range(L)]
            for (i, n), r in zip(names, flat):
                rates[i][n] = r
        info.update(owl_m=config.owl_m, owl_lambda=config.owl_lambda, owl_granularity=config.owl_granularity,
                    outlier_ratio=units)
    elif config.allocation == "rmi":
        n = min(config.rmi_nsamples, calib_ids.shape[0])
        if n < 3:  # two centred Gram matrices of two samples are always proportional: every CKA would be 1
            raise UsageError(f"RMI needs at least 3 calibration windows for its CKA, got {n}")
        if n < 16:
            log.warning("RMI's CKA from only %d windows is noisy (the reference uses 64)", n)
        grams = rmi.GramStream()
        for _, _, X, _ in dense_walk(model, calib_ids[:n], batch_size=config.batch_size, progress=progress):
            grams.add(X)
        cka = grams.cka()
        beta = config.rmi_beta if config.rmi_beta is not None else (100.0 if config.prune_method == "sparsegpt" else 1.0)
        rates = rmi.rates_from_cka(cka, S, beta, config.rmi_delta)
        info.update(rmi_nsamples=n, rmi_beta=beta, rmi_delta=config.rmi_delta if config.rmi_delta is not None
                    else rmi.delta_for(S), cka=[[round(float(v), 6) for v in row] for row in cka])
    else:
        rates = allocate(config.allocation, L, S, atp_beta=config.atp_beta,
                         mean_tolerance=None if config.allow_mean_mismatch else 1e-6)
        if config.allocation == "atp":
            info["atp_beta"] = config.atp_beta
    block_rates = [_block_rate(model, b, r) for b, r in zip(blocks, rates)]
    if config.allocation in DATA_ALLOCATORS:
        check_rates(block_rates, L, S, tol=1e-6 if config.owl_granularity == "block" else 1e-4)
    info["rates"] = block_rates
    if any(isinstance(r, dict) for r in rates):
        info["layer_rates"] = rates
    info["seconds"] = time.perf_counter() - t0
    return rates, info


def _block_rate(model, block, rate) -> float:
    if not isinstance(rate, dict):
        return float(rate)
    linears = block_linears(model, block)
    return sum(rate[n] * lin.weight.numel() for n, lin in linears.items()) / sum(
        lin.weight.numel() for lin in linears.values())


def prune(model, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None = None,
          progress: bool = True, rates: tuple[list, dict] | None = None) -> dict:
    """Prune the linears of every decoder block of `model` in place and return the run report.

    calib_ids: optional (nsamples, seqlen) token windows; drawn from config.calib_dataset when None.
    rates: optional (rates, info) from `resolve_allocation`, computed here when None.
    Raises UsageError for bad settings, an unsupported architecture or a too-short corpus; the model is
    untouched when it raises before pruning starts."""
    config.validate()
    seqlen = validate_for_model(model, config)
    if calib_ids is None:
        calib_ids = calibration_windows(tokenizer, config.calib_dataset, config.nsamples, seqlen, config.seed)
    rates, alloc = rates or resolve_allocation(model, config, calib_ids, progress)
    t0 = time.perf_counter()
    blocks = prune_blocks(model, calib_ids, config.prune_method, rates, config.nm,
                          options={"blocksize": config.blocksize, "percdamp": config.percdamp},
                          batch_size=config.batch_size, progress=progress, diag_nsamples=config.diag)
    seconds = time.perf_counter() - t0
    return {
        "method": config.prune_method,
        "sparsity_type": config.sparsity_type,
        "target_sparsity": config.sparsity_ratio,
        "allocation": alloc,
        "calibration": {"dataset": config.calib_dataset, "nsamples": int(calib_ids.shape[0]),
                        "seqlen": int(calib_ids.shape[1]), "seed": config.seed,
                        "tokens_sha256": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
                        "used": PRUNERS[config.prune_method].STATS != "none" or config.diag > 0
                        or config.allocation in DATA_ALLOCATORS},
        "options": {"blocksize": config.blocksize, "percdamp": config.percdamp,
                    "batch_size": config.batch_size or auto_batch_size(int(calib_ids.shape[1])),
                    "diag_nsamples": config.diag},
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


def save_pruned(model, tokenizer, out_dir, report: dict, run_report: dict | None = None, markdown: str = "",
                overwrite: bool = False, figures: dict | None = None) -> Path:
    """Write an HF directory (safetensors, exact zeros, tokenizer) plus `sparsity_config.json` (from the
    prune `report`), `report.json` (`run_report`, default `report`), `report.md` and any `figures`
    ({file name: function(path)}) atomically: a
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
        for name, draw in (figures or {}).items():
            draw(tmp / name)

    atomic_dir_write(out, write)
    return out


def config_dict(config: PruneConfig) -> dict:
    return asdict(config)
