"""`run_finetune`: one whole fine-tuning run (what `sparsellm finetune` does), config in, run record out.

    for each method (on the same data, so the same fine-tuning tokens):
        load the model ─► fine-tuning examples (once) ─► [dense evaluation] ─► finetune (adapt.finetune)
            ─► evaluation ─► OUT/<method>/ (the merged sparse model, adapter/, report.json/.md)
    OUT/comparison.md and comparison.json side by side (one method: OUT is that method's directory)

LoSA writes a checkpoint to `OUT[/losa].ckpt` after every step; with `resume` an interrupted run continues
from it, and methods that finished before the interruption are not run again (their settings must be the
same). Everything is validated, and every output directory checked, before a model is loaded.

An already-pruned input keeps its masks and per-block rates (`adapt.pruned_input`): its sidecar is read before
the model is loaded, so a --sparsity_ratio or N:M --sparsity_type other than the input's is refused first;
left out, the target is the input's. The record says what was found (`finetune.input`) and holds the
SHA-256 of the calibration tokens (`calibration.tokens_sha256`) and of the fine-tuning examples
(`data.tokens_sha256`).

Devices: `--device` and `--dtype` are resolved before anything is written (`ModelSource.resolve`: --device
cuda without CUDA is a UsageError); the model is loaded in the resolved dtype and moved whole to the device
when it fits (`placement.place`; training needs it whole), and the record holds the resolved names
(`compute_dtype`, `device`), which --resume compares.

Several processes (`accelerate launch` / `torchrun`): data-parallel training, see `run_finetune`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import distributed
from ..adapt.config import FinetuneConfig
from ..adapt.parallel import main_writes
from ..checks import check_weights
from ..config import Evaluation, ModelSource, Output, check_finite, setting
from ..errors import NonFiniteError, UsageError
from ..registry import get
from .record import RESULT, Run, block_rows, evaluate
from .rundir import RunDir, pruned_model

log = logging.getLogger("sparsellm")

METHOD_HELP = ("losa, masked-lora (static), lora (plain, merged: loses sparsity), none; comma-separated runs each "
               "on the same data, into OUT/<method>/, plus OUT/comparison.md")
COMMON = {"command", "model", "model_path", "config", "eval", "eval_dense", "calibration", "blocks", "timings",
          "peak_rss_mib", "versions", "warnings"}


@dataclass
class FinetuneRun:
    """A fine-tuning run: the input model (`source`), the `methods` to compare (comma-separated), the settings
    they share (`finetune`: pruning, calibration, LoRA, training; its own `method` and `method_config` are
    replaced per method), each method's own config (`method_configs`, by name; missing: its defaults), the
    evaluation, and the output directory `output.out` (required; `output.overwrite` replaces it and the
    checkpoints). `resume` continues an interrupted LoSA run from OUT.ckpt; `keep_checkpoint` keeps it."""

    source: ModelSource = field(default_factory=ModelSource)
    methods: str = setting("losa", METHOD_HELP, flag="--method", metavar="METHOD[,...]")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    method_configs: dict = field(default_factory=dict)
    evaluation: Evaluation = field(default_factory=Evaluation)
    output: Output = field(default_factory=Output)
    resume: bool = setting(False, "continue an interrupted LoSA run from OUT.ckpt")
    keep_checkpoint: bool = setting(False, "keep OUT.ckpt after a successful run")

    def method_names(self) -> list[str]:
        """The methods, in order. Raises UsageError for none, a repeated one or an unknown one."""
        out = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not out or len(set(out)) != len(out):
            raise UsageError(f"--method must list distinct methods, got {self.methods!r}")
        for m in out:
            get("finetune", m)
        return out

    def configs(self) -> dict[str, FinetuneConfig]:
        """Each method's full config: the shared settings with its name and its own config. Each gets its own
        copy of the prune settings, so validating it leaves `finetune.prune.sparsity_ratio` None when it was
        left out (it then follows an already-pruned input)."""
        return {m: replace(self.finetune, method=m, method_config=self.method_configs.get(m),
                           prune=copy.deepcopy(self.finetune.prune)) for m in self.method_names()}

    def refuse_unchosen_settings(self) -> "FinetuneRun":
        """UsageError for a setting, given a non-default value, of a method that is not among `methods` (e.g.
        `--steps 3` with `--method none`): it would be silently ignored. For settings given flat (the command
        line builds every registered method's config from its flags), like `PruneConfig.from_flat`."""
        from ..config import flat_defaults, flatten

        chosen = self.method_names()
        mine = {k for m in chosen if self.method_configs.get(m) is not None for k in flatten(self.method_configs[m])}
        for m, c in self.method_configs.items():
            if m in chosen or c is None:
                continue
            defaults = flat_defaults(type(c))
            bad = sorted(k for k, v in flatten(c).items() if k not in mine and k in defaults and v != defaults[k])
            if bad:
                raise UsageError(f"--{bad[0]} is a setting of {m}, which --method {self.methods} does not run")
        return self

    def validate(self) -> "FinetuneRun":
        """Every check before a model is loaded: the settings, then the output directories, checkpoints and
        finished methods (`plan`). Raises UsageError."""
        check_finite(self)
        self.source.validate()
        self.source.resolve()  # --device cuda without CUDA, a dtype the device cannot run: before any work
        self.output.validate()
        configs = {m: c.validate() for m, c in self.configs().items()}
        if self.resume and not any(get("finetune", m).needs == "checkpoint" for m in configs):
            raise UsageError("--resume continues an interrupted LoSA run (--method losa)")
        if self.resume and self.output.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        self.evaluation.validate()
        if not self.output.out:
            raise UsageError("finetune writes model directories: give --out")
        if self.output.save is not None:
            raise UsageError("finetune writes its reports into --out; --save is not supported")
        self.finetune.training.validate(check_file=True)
        self.finetune.calibration.validate(check_file=True)
        self.plan()
        return self

    def dtype_name(self) -> str:
        """The resolved forward dtype's name ("float32", "bfloat16", ...): what the record holds."""
        from ..models.save import dtype_name

        return dtype_name(self.source.resolve()[1])

    def plan(self) -> "_Plan":
        """The output directory of each method, its checkpoint directory, and the methods that finished
        before (with `resume`), after checking them all. Raises UsageError."""
        from ..adapt.pruned_input import from_sidecar, read_sidecar, resolve_target
        from ..models import resolve_model

        _, src = resolve_model(self.source.model)
        if src is not None and (Path(src) / "structure.json").is_file():
            raise UsageError(f"{self.source.model} is a structured model with per-block widths; fine-tuning it is "
                             "not supported")
        pruned = from_sidecar(read_sidecar(src))
        requested = self.finetune.prune
        if pruned is not None:  # before any work: the loaded weights are checked again (adapt.finetune)
            resolve_target(requested.sparsity_ratio, requested.sparsity_type, pruned)
        c, data = self.finetune.calibration.calib_dataset, self.finetune.training.data
        inputs = [src, *(Path(p) for p in {c, data} - {"c4"}),
                  Path(self.evaluation.hellaswag_file) if self.evaluation.hellaswag_file else None]
        configs = self.configs()
        root = Path(self.output.out).expanduser()
        single = len(configs) == 1
        outs = {m: root if single else root / m for m in configs}
        ckpts = {m: Path(f"{outs[m]}.ckpt") for m in configs}
        for m in configs:  # the checkpoint directories are deleted at the end: never an input
            RunDir.prepare(ckpts[m], inputs, overwrite=True)
        overwrite, resume = self.output.overwrite, self.resume
        if not single and not overwrite:
            old = [f.name for f in (root / "comparison.md", root / "comparison.json") if f.exists()]
            if old and not resume:
                raise UsageError(f"{root} already holds {' and '.join(old)} of another run: add --overwrite to "
                                 "replace it")
        dirs, done = {}, set()
        for m, cfg in configs.items():
            resumable = get("finetune", m).needs == "checkpoint"
            if resume and (outs[m] / "report.json").is_file():  # finished (a kept checkpoint or not)
                from ..compare import load_run

                finished = load_run(outs[m])[0]  # UsageError for an unreadable record
                old = finished.get("config", {})
                new = cfg.validate().to_dict()
                diff = sorted(k for k in new if old.get(k) != new[k]
                              and not (k == "sparsity_ratio" and requested.sparsity_ratio is None))  # the input's
                diff += _other_inputs(finished, self.source.model, data)
                diff += [what for what, key, now in (("--eval and its settings", "evaluation", vars(self.evaluation)),
                                                     ("--dtype", "compute_dtype", self.dtype_name()),
                                                     ("--save_dtype", "save_dtype", self.output.save_dtype))
                         if key in finished and finished[key] != now
                         and not (key == "compute_dtype" and finished[key] == self.source.dtype == "auto")]
                if diff:
                    raise UsageError(f"--resume: {outs[m]} was finished with other settings ({', '.join(diff)})")
                done.add(m)  # finished before the interruption
                continue
            dirs[m] = RunDir.prepare(outs[m], inputs, overwrite)
            if resumable and ckpts[m].exists() and not (resume or overwrite):
                raise UsageError(f"a checkpoint of an interrupted run is at {ckpts[m]}: add --resume to continue "
                                 "it, or --overwrite to start again")
            if resume and resumable and not (ckpts[m] / "state.json").is_file():
                raise UsageError(f"--resume: no checkpoint at {ckpts[m]}")
        if not single and resume and not overwrite and (root / "comparison.json").is_file():
            listed = sorted(json.loads((root / "comparison.json").read_text()))
            if set(listed) != set(configs):
                raise UsageError(f"--resume: {root} holds a finished comparison of [{', '.join(listed)}], "
                                 f"not [{', '.join(configs)}]; add --overwrite to start a new one")
        return _Plan(src, root, single, outs, ckpts, dirs, done)


def _other_inputs(finished: dict, model: str, data: str) -> list[str]:
    """Which inputs of a finished run's record differ from this run's: the model (as given), and the
    fine-tuning data (its path, and its bytes' SHA-256 where the record has one)."""
    from ..data import file_sha256

    out = ["the input model"] if finished.get("model") != model else []
    rec = (finished.get("data") or {})
    sha = (rec.get("rows") or {}).get("sha256")
    if rec.get("source") != data or (sha and Path(data).expanduser().is_file()
                                     and file_sha256(Path(data).expanduser()) != sha):
        out.append("the fine-tuning data")
    return out


@dataclass
class _Plan:
    """What `FinetuneRun.plan` checked: the input model's local path, OUT, the per-method directories."""

    src: Path | None
    root: Path
    single: bool
    outs: dict
    ckpts: dict
    dirs: dict  # method -> RunDir, for the methods still to run
    done: set


def run_finetune(cfg: FinetuneRun, progress: bool = True) -> Run:
    """Run every method of `cfg` and write its directory. Returns, for one method, its record (what
    OUT/report.json holds); for several, a comparison record whose `details["runs"]` holds each method's
    record as a dict (what OUT/<method>/report.json holds), in order. `comparison_text` makes the table.
    Raises UsageError for bad input, before anything is written.

    Launched with several processes (`accelerate launch` / `torchrun`; one per GPU) each trains on its share of
    every micro-batch and prunes from its share of the calibration windows, with gradients and statistics
    added over all (`adapt.parallel`); every process holds the same model, and only the main one writes the
    outputs and checkpoints. Every process returns the record."""
    cfg.validate()
    if distributed.launched():  # accelerate launch / torchrun: data-parallel training (adapt/parallel.py)
        distributed.init_from_env(cfg.source.device)
        distributed.shard_windows(cfg.finetune.calibration.nsamples)  # every process needs a window: refused now
        if not distributed.is_main():
            progress = False
            log.setLevel(logging.WARNING)
    plan = cfg.plan()
    data: dict = {}  # the fine-tuning examples, drawn once for all methods
    results, record = {}, None
    for m, fc in cfg.configs().items():  # validated by cfg.validate(); the target may follow the input (None)
        if m in plan.done:
            results[m] = json.loads((plan.outs[m] / "report.json").read_text())
            log.info("%s: finished before, skipped (%s)", m, plan.outs[m])
            continue
        record = _run_method(cfg, plan, m, fc, data, progress)
        results[m] = record.to_dict()
    if plan.single:
        return record if record is not None else from_dict(results[next(iter(results))])
    return _comparison(cfg, plan, results)


def _run_method(cfg: FinetuneRun, plan: _Plan, m: str, fc: FinetuneConfig, data: dict, progress: bool) -> Run:
    """Load the model, fine-tune it with method `m`, evaluate it and write OUT[/m]; returns the record.
    `data` holds the fine-tuning examples once drawn (under "examples")."""
    from ..adapt import finetune, prune_like_report
    from ..adapt.checkpoint import examples_sha
    from ..adapt.pruned_input import read_sidecar
    from ..adapt.train import finetune_examples
    from ..models import check_fits, context_length, load_model, resolve_save_dtype
    from ..devices import describe
    from ..models.save import dtype_name
    from .placement import place

    ev, t, seed = cfg.evaluation, fc.training, fc.calibration.seed
    evals, tasks = ev.names(), ev.zeroshot_tasks()
    resumable = get("finetune", m).needs == "checkpoint"
    device, dtype = cfg.source.resolve()
    model, tok, model_dir = load_model(cfg.source.model, dtype)
    check_fits(model, cfg.output.save_dtype)  # a float16 save that cannot hold a weight: refused before any work
    plan.dirs[m].check_input(model_dir)
    # every method but "none" trains: the whole model must be on the device; "none" only prunes (the engine
    # onloads block by block) and evaluates
    placement = place(model, device, need_whole=m != "none", what=f"fine-tuning ({m})")
    ctx = context_length(model)
    eval_seqlen = min(ev.eval_seqlen, ctx)
    if "examples" not in data:
        ft_seqlen = min(t.ft_seqlen, ctx)
        if ft_seqlen < t.ft_seqlen:
            log.warning("--ft_seqlen %d exceeds the model's context %d; using %d", t.ft_seqlen, ctx, ft_seqlen)
        data["rows"] = {}
        data["examples"] = finetune_examples(tok, t.data, t.ft_nsamples, ft_seqlen, seed + 1, data["rows"])
    examples = data["examples"]
    local = model_dir or plan.src
    details = {"data": {"source": t.data, "ft_nsamples": len(examples), "ft_seqlen": t.ft_seqlen, "seed": seed + 1,
                        "tokens_sha256": examples_sha(examples), "rows": data["rows"]},
               "eval_seqlen": eval_seqlen, "evaluation": vars(ev), "compute_dtype": dtype_name(dtype),
               "device": describe(device), "placement": placement,
               "save_dtype": cfg.output.save_dtype,
               "saved_dtype": dtype_name(resolve_save_dtype(model, cfg.output.save_dtype))}
    record = Run("finetune", cfg.source.model, str(local) if local else None, {}, details=details)
    if ev.eval_dense and evals:
        record.metrics_dense = evaluate(model, tok, ev, eval_seqlen, progress, tasks)
    if cfg.output.overwrite and plan.ckpts[m].exists():
        main_writes(lambda: shutil.rmtree(plan.ckpts[m]))
    main = distributed.is_main()
    details["processes"] = distributed.world()[1]
    with tempfile.TemporaryDirectory(prefix="sparsellm-adapter-") as adir:
        rep = finetune(model, tok, fc, examples, checkpoint_dir=plan.ckpts[m] if resumable else None,
                       resume=cfg.resume and resumable, model_id=f"{local or cfg.source.model} ({dtype_name(dtype)})",
                       adapter_dir=adir if main else None, progress=progress, eval_seqlen=eval_seqlen,
                       sidecar=read_sidecar(local))
        record.config = fc.to_dict()  # with the target finetune settled (an already-pruned input's own)
        details["finetune"] = rep
        try:
            check_weights(model)  # a diverged run (NaN/inf weights) is not saved
        except NonFiniteError as e:
            raise NonFiniteError(f"{m}: after fine-tuning, {e}") from None
        details["prune"] = prune_like_report(model, fc, rep)
        record.calibration = details["prune"]["calibration"]
        record.blocks = block_rows(details["prune"])
        record.timings["finetune"] = rep["seconds"]
        if evals:
            t0 = time.perf_counter()
            record.metrics = evaluate(model, tok, ev, eval_seqlen, progress, tasks)
            record.timings["eval"] = time.perf_counter() - t0
            record.warn_quality(model, details["prune"])
        record.finish()
        # the trained adapter in peft's layout, when the method has one
        files = {"adapter": lambda path: shutil.copytree(adir, path)} if any(Path(adir).iterdir()) else {}
        writer = pruned_model(model, tok, details["prune"], cfg.output.save_dtype)
        main_writes(lambda: plan.dirs[m].write(record.to_dict(), record.markdown(), files=files, model_writer=writer))
    if not cfg.keep_checkpoint:
        main_writes(lambda: plan.ckpts[m].exists() and shutil.rmtree(plan.ckpts[m]))
    log.info("%s: saved to %s (measured sparsity %.4f)", m, plan.outs[m], rep["measured"]["sparsity"],
             extra=RESULT)
    return record


def _comparison(cfg: FinetuneRun, plan: _Plan, results: dict) -> Run:
    """The comparison record, with OUT/comparison.md and comparison.json written."""
    from ..outputs import write_text_atomic

    first = next(iter(results.values()))
    record = Run("finetune", cfg.source.model, first.get("model_path"), {"methods": list(results)},
                 details={"runs": results})
    record.timings = {m: (r.get("finetune") or {}).get("seconds") for m, r in results.items()}
    record.finish()
    text = comparison_text(record)
    main_writes(lambda: RunDir(plan.root, replaces=False).write(
        json_files={"comparison.json": {m: {k: r.get(k) for k in ("finetune", "eval", "config")}
                                        for m, r in results.items()}},
        files={"comparison.md": lambda path: write_text_atomic(path, "# sparsellm finetune\n\n" + text + "\n")}))
    return record


def from_dict(run: dict) -> Run:
    """A record back from its report.json (`Run.to_dict`'s inverse; method sections go to `details`)."""
    return Run(run["command"], run.get("model", ""), run.get("model_path"), run.get("config") or {},
               run.get("calibration"), run.get("eval") or {}, run.get("eval_dense") or {}, run.get("blocks") or [],
               run.get("timings") or {}, run.get("peak_rss_mib") or 0.0, run.get("versions") or {},
               {k: v for k, v in run.items() if k not in COMMON}, run.get("warnings") or [])


def comparison_text(record: Run) -> str:
    """The methods side by side (report.finetune_comparison): one row per method of a comparison record,
    or one row for a single method's record."""
    from ..report import finetune_comparison

    runs = record.details.get("runs") or {record.config["method"]: record.to_dict()}
    return finetune_comparison(runs)


__all__ = ["FinetuneRun", "run_finetune", "comparison_text", "from_dict"]
