"""`run_prune`: one whole pruning run (what `sparsellm prune` and `sparsellm allocate` do), config in,
run record out.

    load the model ─► calibration windows ─► [dense evaluation] ─► [ATP β search] ─► layer-wise rates
        ─► prune (engine) ─► evaluation ─► the run directory (model, sidecar, report.json/.md, figures)

Everything is validated before the model is loaded, and again against the model before any calibration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import distributed
from ..allocate import resolve_allocation
from ..allocate.atp_search import ATPSearchConfig
from ..config import Evaluation, ModelSource, Output, check_finite
from ..errors import UsageError
from ..pipeline import PruneConfig, prune, validate_for_model
from .record import RESULT, Run, block_rows, evaluate
from .rundir import RunDir, pruned_model
from .stream import Partial, check_room, output_bytes

log = logging.getLogger("sparsellm")

REPORT_FILES = ("report.json", "report.md", "rates.json", "errors.png", "atp_search.png")


@dataclass
class PruneRun:
    """A pruning run. command "allocate" also writes rates.json into `output.save` and prunes only when
    something is evaluated or saved; `search` (allocate only) chooses ATP's β first."""

    source: ModelSource = field(default_factory=ModelSource)
    prune: PruneConfig = field(default_factory=PruneConfig)
    evaluation: Evaluation = field(default_factory=Evaluation)
    output: Output = field(default_factory=Output)
    search: ATPSearchConfig | None = None
    command: str = "prune"
    resume: bool = False

    def validate(self) -> "PruneRun":
        """Every check that needs no model. Raises UsageError."""
        check_finite(self)
        self.source.validate()
        self.output.validate()
        self.prune.validate()
        if self.search is not None:
            if self.command != "allocate":
                raise UsageError("ATP's β search runs under `sparsellm allocate --search`")
            if self.prune.allocation not in ("atp", "atp_dlp"):
                raise UsageError("--search is ATP's β search: use it with --allocation atp (or atp_dlp)")
            if getattr(self.prune.allocator, "atp_beta", 0.0) or getattr(self.prune.allocator, "atp_dlp_beta", None):
                raise UsageError("--search chooses β itself: leave out --atp_beta / --atp_dlp_beta")
            self.search.validate()
        self.evaluation.validate()
        self.prune.calibration.validate(check_file=True)
        if self.resume and self.output.out is None:
            raise UsageError("--resume continues a streamed prune into --out: give the same --out")
        return self

    def check_streamable(self) -> None:
        """What a lazy (streamed) prune cannot do, refused before any work. Raises UsageError."""
        if self.output.out is None:
            raise UsageError("--load lazy streams the pruned blocks into --out: give --out")
        if self.search is not None:
            raise UsageError("ATP's β search prunes the model many times and needs it in memory: use --load memory")

    def inputs(self) -> list:
        c = self.prune.calibration
        return [Path(c.calib_dataset) if c.calib_dataset != "c4" else None,
                Path(self.prune.allocation[5:]) if self.prune.allocation.startswith("file:") else None,
                Path(self.evaluation.hellaswag_file) if self.evaluation.hellaswag_file else None]


def _figures(run: dict) -> dict:
    """PNG files to write next to a report: {file name: function(path)}."""
    from .. import plots

    figs = {}
    if run.get("prune") and any(b.get("rel_error") is not None for b in run["prune"]["blocks"]):
        label = f"{run['prune']['method']} {run['allocation']['name']}, {run['prune'].get('sparsity_type', '')}"
        figs["errors.png"] = lambda path: plots.error_curves({label: run["prune"]["blocks"]}, path)
    if run.get("search"):
        figs["atp_search.png"] = lambda path: plots.beta_search(run["search"], path)
    return figs


def run_prune(cfg: PruneRun, progress: bool = True) -> Run:
    """Run `cfg` and return its record; the pruned model and reports are written where `cfg.output` says.
    A lazy model (`--load`) is pruned block by block from its shards and streamed into the output
    (`runs.stream`). Raises UsageError for bad input, before anything is written."""
    from ..allocate.atp_search import beta_grid, search
    from ..data import calibration_windows
    from ..models import check_fits, context_length, get_blocks, load_model, resolve_model, resolve_save_dtype
    from ..models.load import load_lazy, wants_lazy
    from ..models.save import dtype_name
    from ..onload import attach

    cfg.validate()
    launched = distributed.launched()
    if launched:  # torchrun / accelerate launch: each process runs its share of the windows (distributed.py)
        distributed.init_from_env(cfg.source.device)
        if cfg.resume:
            raise UsageError("--resume continues a single-process streamed prune; run it without torchrun")
        distributed.shard_windows(cfg.prune.calibration.nsamples)  # every process needs a window: refused now
        if not distributed.is_main():
            progress = False
            log.setLevel(logging.WARNING)
    main = distributed.is_main()
    pc, ev, out = cfg.prune, cfg.evaluation, cfg.output
    names, tasks = ev.names(), ev.zeroshot_tasks()
    _, src = resolve_model(cfg.source.model)
    if src is not None and (Path(src) / "structure.json").is_file():
        raise UsageError(f"{cfg.source.model} is a structured model with per-block widths; pruning it again is "
                         "not supported")
    inputs = [src, *cfg.inputs()]
    model_dir_out = RunDir.prepare(out.out, inputs, out.overwrite)
    save = RunDir.prepare(out.save, inputs + [model_dir_out and model_dir_out.path], out.overwrite, replaces=False)
    if save is not None:
        save.refuse_replacing_record()
    if save is not None:
        save.refuse_overwriting(REPORT_FILES, cfg.inputs())
    device, dtype = cfg.source.resolve()
    lazy = wants_lazy(cfg.source.load, cfg.source.model, dtype)
    if lazy:
        cfg.check_streamable()
    elif cfg.resume:
        raise UsageError("--resume continues a streamed prune: use it with --load lazy")
    model, tok, model_dir = (load_lazy if lazy else load_model)(cfg.source.model, dtype)
    attach(model, device)
    check_fits(model, out.save_dtype)  # a float16 save that cannot hold a weight: refused before any work
    for rd in (model_dir_out, save):
        if rd is not None:
            rd.check_input(model_dir)
    seqlen = validate_for_model(model, pc)
    if cfg.search is not None:
        beta_grid(len(get_blocks(model)), pc.sparsity_ratio, cfg.search.atp_step)  # before any calibration
    partial = _streamed_output(cfg, model, device, dtype, [src, model_dir]) if lazy and main else None
    log.info("%s model on %s, forwards in %s%s", "lazy (blocks read from the shards in turn)" if lazy else "in-memory",
             device, dtype_name(dtype), f", streamed into {partial.dir}" if partial else "")
    c = pc.calibration
    calib = calibration_windows(tok, c.calib_dataset, c.nsamples, seqlen, c.seed)
    if partial is not None:
        from ..provenance import tokens_sha256

        partial.check("calibration_sha256", tokens_sha256(calib))  # the windows themselves (data file, tokenizer)
    if model_dir_out is not None and not lazy:
        check_room(out.out, output_bytes([p.shape for p in model.parameters()], resolve_save_dtype(model, out.save_dtype)))
    eval_seqlen = min(ev.eval_seqlen, context_length(model))
    local = model_dir or src
    details: dict = {"eval_seqlen": eval_seqlen, "device": str(device), "lazy": lazy,
                     "processes": distributed.world()[1]}
    record = Run(cfg.command, cfg.source.model, str(local) if local else None, pc.to_dict(), details=details)
    if ev.eval_dense and names:  # every process (a long evaluation on one alone could time the others out)
        record.metrics_dense = evaluate(model, tok, ev, eval_seqlen, progress, tasks)
    if cfg.search is not None:
        s = cfg.search
        obj_seqlen = min(s.objective_seqlen or eval_seqlen, context_length(model))
        if pc.allocation == "atp_dlp":  # β and α jointly, within ATP's trial budget
            from ..allocate.atp_search import search_joint
            from ..allocate.dlp import block_scores

            t0 = time.perf_counter()
            scores = block_scores(model, calib, "mean", c.batch_size, progress)
            details["search"] = search_joint(model, tok, calib, pc.prune_method, pc.sparsity_ratio, scores,
                                             s.atp_step, objective=s.objective, objective_windows=s.objective_windows,
                                             objective_seqlen=obj_seqlen, options=pc.options(),
                                             batch_size=c.batch_size, progress=progress, engine=pc.engine,
                                             monotone=not pc.allocator.atp_dlp_unordered, kind=s.atp_trials)
            details["search"]["search_seconds"] = time.perf_counter() - t0  # with the DLP scores' dense pass
            pc.allocator.atp_dlp_beta = details["search"]["best_beta"]
            pc.allocator.atp_dlp_alpha = details["search"]["best_alpha"]
            record.config.update(atp_dlp_beta=pc.allocator.atp_dlp_beta, atp_dlp_alpha=pc.allocator.atp_dlp_alpha)
        else:
            details["search"] = search(model, tok, calib, pc.prune_method, pc.sparsity_ratio, s.atp_step, s.objective,
                                       s.objective_windows, obj_seqlen, options=pc.options(),
                                       batch_size=c.batch_size, progress=progress, strategy=s.atp_search,
                                       engine=pc.engine, kind=s.atp_trials)
            pc.allocator.atp_beta = details["search"]["best_beta"]
            record.config["atp_beta"] = pc.allocator.atp_beta
        details["search"]["objective"]["also_evaluated"] = s.objective in names  # then not held out from it
        record.timings["search"] = details["search"]["search_seconds"]
    rates = resolve_allocation(model, pc, calib, progress, tokenizer=tok)
    details["allocation"] = rates[1]
    record.timings["allocation"] = rates[1]["seconds"]
    if cfg.command == "prune" or names or model_dir_out is not None:
        t0 = time.perf_counter()
        stream = partial.begin(model, rates[0], resolve_save_dtype(model, out.save_dtype)) if partial else {}
        details["prune"] = prune(model, tok, pc, calib_ids=calib, progress=progress, rates=rates, **stream)
        record.timings["prune"] = time.perf_counter() - t0
        if partial is not None:
            details["resumed_at_block"] = stream["resume"]["block"] if stream["resume"] else 0
            model = partial.finish(model, tok, details["prune"], dtype, device)  # the pruned model, from its shards
        record.calibration = details["prune"]["calibration"]
        record.blocks = block_rows(details["prune"])
        record.warnings = list(details["prune"]["warnings"])  # logged by prune()
        if names and main:  # no collective after pruning: the other processes are done
            t0 = time.perf_counter()
            record.metrics = evaluate(model, tok, ev, eval_seqlen, progress, tasks)
            record.timings["eval"] = time.perf_counter() - t0
            record.warn_quality(model, details["prune"])
    if model_dir_out is not None:  # what the saved weights are in (config.json declares it too)
        details["saved_dtype"] = dtype_name(resolve_save_dtype(model, out.save_dtype))
    record.finish()
    if not main:  # the main process writes the outputs
        return record
    run = record.to_dict()
    md, figures = record.markdown(), _figures(run)
    if model_dir_out is not None:
        writer = partial.model_writer() if partial else pruned_model(model, tok, details["prune"], out.save_dtype)
        model_dir_out.write(run, md, model_writer=writer, figures=figures)
        if partial is not None:
            partial.remove()
        log.info("saved pruned model to %s", model_dir_out.path, extra=RESULT)
    if save is not None:
        rates_json = {"rates.json": [round(r, 12) for r in details["allocation"]["rates"]]} \
            if cfg.command == "allocate" else {}
        save.write(run, md, json_files=rates_json, figures=figures)
    return record


def _streamed_output(cfg: PruneRun, model, device, dtype, inputs) -> Partial:
    """The OUT.partial of a lazy prune, checked against an interrupted run (`--resume`) and the disk's room."""
    from ..models import resolve_save_dtype
    from ..models.save import dtype_name

    save_dtype = resolve_save_dtype(model, cfg.output.save_dtype)
    settings = {"command": cfg.command, **cfg.prune.to_dict(), "dtype": dtype_name(dtype), "device": device.type,
                "save_dtype": dtype_name(save_dtype), "input": model.sparsellm_lazy.fingerprint()}
    partial = Partial(cfg.output.out, settings, cfg.resume, inputs)
    check_room(cfg.output.out, output_bytes(model.sparsellm_lazy.shapes.values(), save_dtype), partial.written)
    return partial
