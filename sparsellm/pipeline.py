"""Pruning one in-memory model: a `PruneConfig` in, the model changed in place, a prune report out.

    cfg = PruneConfig(prune_method="sparsegpt", sparsity_ratio=0.6, pruner=SparseGPTConfig(blocksize=64))
    cfg = PruneConfig.from_flat(prune_method="sparsegpt", sparsity_ratio=0.6, blocksize=64, nsamples=32)
    report = prune(model, tokenizer, cfg)

The config composes the shared `Calibration` settings with the chosen pruner's and allocator's own configs
(from the registry), so every setting is declared once. `prune` draws the calibration windows, resolves the
layer-wise rates (`allocate.resolve_allocation`) and runs the engine (`engine.prune_blocks`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field


from .allocate import resolve_allocation
from .checks import block_warnings, check_weights
from .config import Calibration, check_finite, flat_defaults, setting
from .data import calibration_windows, corpus_rows
from .engine import auto_batch_size, blocks_sparsity, prune_blocks
from .errors import UsageError
from .lazy import lazy_import
from .models import block_linears, context_length, get_arch, get_blocks
from .provenance import peak_rss_mib, tokens_sha256, versions
from .prune import check_sparsity, parse_pattern
from .prune.masks import ALREADY_SPARSE
from .registry import get

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")


@dataclass
class PruneConfig:
    """Settings of one pruning run (names follow Wanda/SparseGPT).

    prune_method: a registered pruner ("magnitude", "wanda", "sparsegpt"); `pruner` its own config (None:
        its defaults; SparseGPT: blocksize, percdamp).
    sparsity_ratio: target fraction of zeros in [0, 1) (None: 0.5, or implied by an N:M pattern as 1 − N/M).
    sparsity_type: "unstructured" or "N:M" (keep N of every M weights along the input dimension).
    allocation: a registered allocator ("uniform", "atp", "owl", "rmi", "dlp", "alphapruning", "lsa",
        "atp_dlp") or "file:PATH"; `allocator` its own config (None: its defaults; ATP: atp_beta; OWL: owl_m,
        owl_lambda, owl_granularity; RMI: rmi_nsamples, rmi_beta, rmi_delta; DLP: dlp_alpha, dlp_score;
        AlphaPruning: alpha_epsilon, alpha_mapping; LSA: lsa_lambda, lsa_block, lsa_resp; ATP+DLP:
        atp_dlp_beta, atp_dlp_alpha, atp_dlp_unordered; file: allow_mean_mismatch).
    calibration: the calibration windows (nsamples × seqlen from calib_dataset with seed, batch_size).
    diag_nsamples: windows also run through the dense blocks for the cumulative reconstruction error
        (None: 8 for Wanda/SparseGPT, 0 for magnitude; 0 turns it off).
    engine: "block" (two forwards per block) or "single" (one; `single_pass.py`)."""

    prune_method: str = setting("wanda", "magnitude: |W| per matrix; wanda: |W|·‖X‖ per output row; sparsegpt: "
                                         "OBS weight update")
    sparsity_ratio: float | None = setting(None, "target fraction of zeros in [0, 1); 0.5 when left out; implied "
                                                 "by an N:M --sparsity_type")
    sparsity_type: str = setting("unstructured", "unstructured, or N:M = keep N of every M input weights "
                                                 "(2:4, 4:8, ...)")
    allocation: str = setting("uniform", "layer-wise sparsity: uniform, atp (with --atp_beta), owl, rmi, dlp, alphapruning, lsa, "
                                         "atp_dlp, search "
                                         "(GA or EvoPress search of per-block rates on held-out C4), or "
                                         "file:rates.json (a list, or a dict by block index, whose mean is the target)")
    diag_nsamples: int | None = setting(None, "windows also run through the dense blocks for the cumulative "
                                              "reconstruction error per block (default when left out: 8, or 0 for "
                                              "magnitude); 0 turns it off")
    engine: str = setting("block", "block: per block a statistics pass, then a replay with the pruned weights (the "
                                   "papers' statistics); single: one forward per block, each group of linears pruned "
                                   "from the inputs it sees after the groups before it are pruned",
                          choices=("block", "single"))
    pruner: object = None
    allocator: object = None
    calibration: Calibration = field(default_factory=Calibration)

    @classmethod
    def from_flat(cls, **settings) -> "PruneConfig":
        """A config from flat keyword settings (the command line's and the old API's shape): each key goes to
        PruneConfig, Calibration, the chosen pruner's or the chosen allocator's config. Raises UsageError for
        a setting of a method that is not chosen (e.g. owl_m without allocation="owl") or of no method."""
        own = {f.name for f in dataclasses.fields(cls)} - {"pruner", "allocator", "calibration"}
        calib = {f.name for f in dataclasses.fields(Calibration)}
        top = {k: v for k, v in settings.items() if k in own}
        cfg = cls(**top, calibration=Calibration(**{k: v for k, v in settings.items() if k in calib}))
        rest = {k: v for k, v in settings.items() if k not in own and k not in calib}
        try:
            pruner, allocator = get("pruner", cfg.prune_method), get("allocator", cfg.allocation_name)
        except UsageError:
            return cfg  # validate() names the unknown method
        cfg.pruner = pruner.config(**{k: rest.pop(k) for k in list(rest) if k in pruner.field_names()})
        cfg.allocator = allocator.config(**{k: rest.pop(k) for k in list(rest) if k in allocator.field_names()})
        rest = {k: v for k, v in rest.items() if v != _default_of(k)}  # another method's setting at its default
        if rest:
            raise UsageError(_foreign_settings(rest))
        return cfg

    @property
    def allocation_name(self) -> str:
        return "file" if self.allocation.startswith("file:") else self.allocation

    @property
    def nm(self):
        return parse_pattern(self.sparsity_type)

    @property
    def diag(self) -> int:
        n = self.calibration.nsamples
        if self.diag_nsamples is not None:
            return min(self.diag_nsamples, n)
        return 0 if self.prune_method == "magnitude" else min(8, n)

    def options(self) -> dict:
        """The pruner's own settings as keyword arguments."""
        return dataclasses.asdict(self.pruner) if dataclasses.is_dataclass(self.pruner) else {}

    def validate(self) -> "PruneConfig":
        """Check everything that does not need the model; fill the defaults (sparsity_ratio from N:M or 0.5,
        the methods' configs). Raises UsageError."""
        check_finite(self)
        pruner, allocator = get("pruner", self.prune_method), get("allocator", self.allocation_name)
        nm = parse_pattern(self.sparsity_type)
        if nm is not None:
            if self.sparsity_ratio is not None and abs(self.sparsity_ratio - nm.sparsity) > 1e-9:
                raise UsageError(f"--sparsity_ratio {self.sparsity_ratio} contradicts the {nm} pattern "
                                 f"(which is {nm.sparsity:g} sparse); leave it out for N:M")
            self.sparsity_ratio = nm.sparsity
        elif self.sparsity_ratio is None:
            self.sparsity_ratio = 0.5
        check_sparsity(self.sparsity_ratio)
        self.pruner = pruner.config() if self.pruner is None else self.pruner
        if self.allocator is None:
            self.allocator = allocator.config()
        if not isinstance(self.pruner, pruner.config) or not isinstance(self.allocator, allocator.config):
            raise UsageError(f"the method configs do not match prune_method {self.prune_method!r} and allocation "
                             f"{self.allocation!r}")
        if self.allocation_name == "file":
            self.allocator.path = self.allocation[len("file:"):]
        self.pruner.validate()
        self.allocator.validate(self.sparsity_ratio)
        self.calibration.validate()
        if self.engine not in ("block", "single"):
            raise UsageError(f"--engine must be block or single, got {self.engine!r}")
        if self.engine == "single":
            import importlib.util

            if importlib.util.find_spec("greenlet") is None:
                raise UsageError("--engine single needs the greenlet package (pip install greenlet), or use "
                                 "--engine block")
        if self.diag_nsamples is not None and self.diag_nsamples < 0:
            raise UsageError(f"--diag_nsamples must be >= 0, got {self.diag_nsamples}")
        if nm is not None and self.allocation != "uniform":
            raise UsageError("N:M patterns use uniform allocation")
        return self

    def to_dict(self) -> dict:
        """Flat settings, as `from_flat` takes them (and as reports record them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("pruner", "allocator", "calibration")}
        out.update(dataclasses.asdict(self.calibration))
        for sub in (self.pruner, self.allocator):
            if dataclasses.is_dataclass(sub):
                out.update({k: v for k, v in dataclasses.asdict(sub).items() if k != "path"})
        return out


def _default_of(key: str):
    """The default of setting `key` in whichever pruner's or allocator's config declares it (a unique
    object when none does)."""
    from .registry import names

    for kind in ("pruner", "allocator"):
        for name in names(kind):
            defaults = flat_defaults(get(kind, name).config)
            if key in defaults:
                return defaults[key]
    return object()


def _foreign_settings(rest: dict) -> str:
    """The error for settings that belong to an unchosen method, or to none."""
    from .registry import names

    for kind, flag in (("allocator", "--allocation"), ("pruner", "--prune_method")):
        for name in names(kind):
            theirs = sorted(set(rest) & set(get(kind, name).field_names()))
            if theirs:
                verb = "applies" if len(theirs) == 1 else "apply"
                where = "file:PATH" if name == "file" else name
                return f"{', '.join('--' + k for k in theirs)} {verb} only to {flag} {where}"
    return f"unknown settings: {', '.join(sorted(rest))}"


def validate_for_model(model, config: PruneConfig, warn: bool = True) -> int:
    """Checks that need the model: architecture, every weight finite, N:M divisibility of every in_features,
    the allocation (β range, rates file length and mean). Returns the calibration seqlen, capped at the
    model's context length (logged when `warn`). Raises UsageError (NonFiniteError, naming the module, for a
    NaN/inf weight)."""
    blocks = get_blocks(model)
    check_weights(model)
    nm = config.nm
    for block in blocks:
        for name, lin in block_linears(model, block).items():
            if nm is not None and lin.in_features % nm.m:
                raise UsageError(f"{name}: in_features {lin.in_features} is not divisible by M = {nm.m} ({nm})")
    if get("allocator", config.allocation_name).needs == "none":
        resolve_allocation(model, config, None, progress=False)  # fail early: β range, rates file
    ctx = context_length(model)
    seqlen = config.calibration.seqlen
    if seqlen > ctx and warn:
        log.warning("seqlen %d exceeds the model's context %d; using %d", seqlen, ctx, ctx)
    return min(seqlen, ctx)


def prune(model, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None = None,
          progress: bool = True, rates: tuple[list, dict] | None = None, on_block_end=None,
          resume: dict | None = None) -> dict:
    """Prune the linears of every decoder block of `model` in place and return the prune report.

    calib_ids: optional (nsamples, seqlen) token windows; drawn from the calibration config when None.
    rates: optional (rates, info) from `resolve_allocation`, computed here when None.
    on_block_end, resume: passed to `engine.prune_blocks` (a streamed run saves its progress and resumes).
    The report records the input's sparsity (`input`: zeros, params, sparsity of the block linears before
    pruning, and `refilled`: how many of those zeros are non-zero after it, 0 unless SparseGPT met a linear
    under `prune.masks.ALREADY_SPARSE` zeros; `input_already_sparse`: at least that fraction overall)
    and `warnings`: the blocks where the cumulative error explodes (`checks.block_warnings`), also logged.
    Raises UsageError for bad settings, an unsupported architecture or a too-short corpus, NonFiniteError
    for NaN/inf weights or statistics; the model is untouched when it raises before pruning starts."""
    config.validate()
    seqlen = validate_for_model(model, config, warn=calib_ids is None)  # given windows: the caller drew them
    c = config.calibration
    if calib_ids is None:
        calib_ids = calibration_windows(tokenizer, c.calib_dataset, c.nsamples, seqlen, c.seed)
    rates, alloc = rates or resolve_allocation(model, config, calib_ids, progress, tokenizer=tokenizer)
    t0 = time.perf_counter()
    blocks = prune_blocks(model, calib_ids, config.prune_method, rates, config.nm, options=config.options(),
                          batch_size=c.batch_size, progress=progress, diag_nsamples=config.diag,
                          on_block_end=on_block_end, resume=resume, engine=config.engine)
    seconds = time.perf_counter() - t0
    before = blocks_sparsity(blocks, before=True)  # the blocks of a lazy model are no longer in memory
    if before["sparsity"] >= ALREADY_SPARSE:
        log.info("the input was already %.4f sparse (%d zeros)", before["sparsity"], before["zeros"])
    used = (get("pruner", config.prune_method).needs != "none" or config.diag > 0
            or get("allocator", config.allocation_name).needs == "data")
    before["refilled"] = sum(b["refilled"] for b in blocks)
    warnings = block_warnings(blocks)
    for w in warnings:
        log.warning("sparsellm: warning: %s", w)
    return {
        "method": config.prune_method,
        "sparsity_type": config.sparsity_type,
        "target_sparsity": config.sparsity_ratio,
        "allocation": alloc,
        "calibration": {"dataset": c.calib_dataset, "nsamples": int(calib_ids.shape[0]),
                        "seqlen": int(calib_ids.shape[1]), "seed": c.seed,
                        "tokens_sha256": tokens_sha256(calib_ids), "used": used,
                        "rows": corpus_rows(c.calib_dataset)},
        "options": {**config.options(), "batch_size": c.batch_size or auto_batch_size(int(calib_ids.shape[1])),
                    "diag_nsamples": config.diag, "engine": config.engine},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "measured": blocks_sparsity(blocks),
        "input": before,
        "input_already_sparse": before["sparsity"] >= ALREADY_SPARSE,
        "blocks": blocks,
        "warnings": warnings,
        "prune_seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


def sparsity_sidecar(model, report: dict) -> dict:
    """The `sparsity_config.json` sidecar (llm-compressor's key names where they exist). `input_sparsity`:
    the block linears' fraction of zeros before pruning; `input_already_sparse`: at least
    `prune.masks.ALREADY_SPARSE` (the input was a pruned model, whose zeros were kept)."""
    prefix = get_arch(model).blocks
    modules = {f"{prefix}.{b['block']}.{name}": m for b in report["blocks"] for name, m in b["modules"].items()}
    return {
        "format": "dense",
        "method": report["method"],
        "sparsity_structure": report["sparsity_type"],
        "global_sparsity": report["measured"]["sparsity"],
        "target_sparsity": report["target_sparsity"],
        "input_sparsity": (report.get("input") or {}).get("sparsity"),  # None: not measured (fine-tuning runs)
        "input_already_sparse": report.get("input_already_sparse"),
        "targets": sorted(modules),
        "ignore": ["embeddings", "lm_head", "norms"],
        "modules": modules,
        "allocation": report["allocation"],
        "calibration": report["calibration"],
        "versions": report["versions"],
    }
