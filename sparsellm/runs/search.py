"""`run_search`: one whole Self-Pruner run (what `sparsellm search` does; Huang et al., 2025), config in,
run record out.

    load the model ─► calibration windows ─► importance of heads and channels ─► evolutionary search of
        layer-wise rates (the backend's operators, fitness on held-out C4) ─► the best k re-scored with the
        evaluation ─► [speed against dense] ─► the structured model directory with its reports

The search state lives in `OUT.search/` (state.json after every generation, llm_log.jsonl), so an
interrupted search continues with `resume`; it is copied into OUT (search_state.json, llm_log.jsonl) and
removed at the end unless `keep_state`, only once OUT is written (a failed save leaves it to `resume`).
Everything is validated before the model is loaded.

Devices: `--device` / `--dtype` are resolved in `validate` (`ModelSource.resolve`: --device cuda without CUDA
is a UsageError before anything is written). The dense model is moved whole to the device when it fits twice
(a candidate is a shrunk copy of it), else it stays in CPU memory with its blocks onloaded for the importance
pass (`placement.place`); fitness and final scores run on the device either way. The record holds the
resolved names (`config.dtype`, `config.device`, `device`), and a resumed search must have the same dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Calibration, Evaluation, ModelSource, Output, check_finite, flatten, setting
from ..errors import UsageError
from ..provenance import tokens_sha256
from ..registry import get, names
from ..selfpruner import Fitness, SearchConfig, Structure
from ..selfpruner.backends import ALIAS, all_settings, resolve_alias
from ..selfpruner.parallel import Parallel
from .record import RESULT, Run, evaluate
from .rundir import RunDir

log = logging.getLogger("sparsellm")

BACKEND_HELP = ("search operators: ga (classical), openai (any OpenAI-compatible endpoint), local (a chat model "
                "in-process), llm (openai when --llm_base_url is given, else local), evopress (EvoPress's level-switch "
                "mutation and multi-step selection, no LLM; --evo_* settings), uniform (no search: the target rate "
                "everywhere)")


@dataclass
class SearchRun:
    """A Self-Pruner run: the model (`source`), the evolution (`search`), what a rate removes
    (`structure`), the fitness, the importance's calibration windows (32 × 512 tokens unless set), the
    search backend ("ga", "openai", "local", "uniform"; "llm" is resolved by `validate`) with its own
    config (None: its defaults), the final evaluation, where the fitness runs (`parallel`: serially, or on Ray
    workers), and the output directory `output.out` (with `output.overwrite`). `resume` continues an interrupted search from OUT.search/, `keep_state` keeps that
    directory after success, `bench` measures prefill / decode speed against the dense model at the end."""

    source: ModelSource = field(default_factory=ModelSource)
    search: SearchConfig = field(default_factory=SearchConfig)
    structure: Structure = field(default_factory=Structure)
    fitness: Fitness = field(default_factory=Fitness)
    calibration: Calibration = field(default_factory=lambda: Calibration(nsamples=32, seqlen=512))
    backend: str = setting("ga", BACKEND_HELP, choices=(*names("search_backend"), ALIAS))
    backend_config: object = None
    evaluation: Evaluation = field(default_factory=Evaluation)
    parallel: Parallel = field(default_factory=Parallel)
    output: Output = field(default_factory=Output)
    resume: bool = setting(False, "continue an interrupted search from OUT.search/")
    keep_state: bool = setting(False, "keep OUT.search/ after a successful run")
    bench: bool = setting(False, "measure prefill / decode speed against dense at the end")

    def validate(self) -> "SearchRun":
        """Every check that needs no model; resolves the "llm" alias and fills the backend's default
        config. Raises UsageError."""
        check_finite(self)
        self.source.validate()
        self.source.resolve()  # --device cuda without CUDA, a dtype the device cannot run: before any work
        self.output.validate()
        self.search.validate()
        self.structure.validate()
        self.fitness.validate()
        self.calibration.validate()
        self.backend = resolve_alias(self.backend, getattr(self.backend_config, "llm_base_url", None))
        method = get("search_backend", self.backend)
        if self.backend_config is None:
            self.backend_config = method.config()
        if not isinstance(self.backend_config, method.config):
            raise UsageError(f"a {type(self.backend_config).__name__} is not the config of --backend {self.backend} "
                             f"({method.config.__name__})")
        self.backend_config.validate()
        if not self.output.out:
            raise UsageError("search writes a model directory: give --out")
        if self.output.save is not None:
            raise UsageError("search writes its reports into --out; --save is not supported")
        if self.resume and self.output.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        if self.resume and self.backend == "uniform":
            raise UsageError("--resume continues a search; --backend uniform does not search")
        if self.evaluation.eval_dense:
            raise UsageError("search does not evaluate the dense model (--eval_dense)")
        self.evaluation.validate()
        self.calibration.validate(check_file=True)
        self.parallel.validate()
        if self.parallel.enabled:
            if self.backend == "uniform":
                raise UsageError("--workers / --ray_address score a search's candidates; --backend uniform does not search")
            if self.backend == "evopress":
                raise UsageError("--workers / --ray_address score the candidates of ga, openai and local searches; "
                                 "--backend evopress runs serially")
            from ..selfpruner.parallel import check_reachable, import_ray

            import_ray()
            if self.parallel.ray_address is not None:
                check_reachable(self.parallel.ray_address)
        return self

    def inputs(self, src) -> list:
        """The paths the run reads: the model's directory or file, a calibration file, the local chat model
        (backend local) and a HellaSwag file."""
        from ..models import resolve_model

        c = self.calibration.calib_dataset
        local = self.backend_config.model if self.backend == "local" else None
        return [src, Path(c) if c != "c4" else None, resolve_model(local)[1] if local else None,
                Path(self.evaluation.hellaswag_file) if self.evaluation.hellaswag_file else None]

    def to_dict(self) -> dict:
        """Flat settings, as the command line's flags name them (what report.json records as `config`).
        Only the chosen backend's settings are listed; `calib_seed` only when it differs from the seed."""
        asdict = dataclasses.asdict
        calib = asdict(self.calibration)
        out = {**asdict(self.source), **asdict(self.search), **asdict(self.structure), **asdict(self.fitness),
               **{k: v for k, v in calib.items() if k != "seed"}, "backend": self.backend}
        if calib["seed"] != self.search.seed:
            out["calib_seed"] = calib["seed"]
        out.update(flatten(self.backend_config))
        out.update({k: v for k, v in asdict(self.evaluation).items() if k != "eval_dense"})
        out.update(asdict(self.parallel))
        out.update(out=self.output.out, overwrite=self.output.overwrite, save_dtype=self.output.save_dtype,
                   resume=self.resume, keep_state=self.keep_state, bench=self.bench)
        return out


def _state_dir(cfg: SearchRun, out: RunDir, inputs: list) -> Path:
    """OUT.search/, checked: an interrupted search there needs `resume` (or `overwrite`); `resume` needs one."""
    state_dir = RunDir.prepare(f"{out.path}.search", inputs, overwrite=True).path
    has_state = (state_dir / "state.json").is_file()
    if has_state and not (cfg.resume or cfg.output.overwrite):
        raise UsageError(f"an interrupted search is at {state_dir}: add --resume to continue it, or --overwrite "
                         "to start again")
    if cfg.resume and not has_state:
        raise UsageError(f"--resume: no search state at {state_dir}")
    return state_dir


def _resolved(cfg: SearchRun) -> tuple:
    """(torch.device, torch.dtype, dtype name) of the run (`ModelSource.resolve`)."""
    from ..models.save import dtype_name

    device, dtype = cfg.source.resolve()
    return device, dtype, dtype_name(dtype)


def _state_settings(cfg: SearchRun, model_path: str, seqlen: int, digest: str | None) -> dict:
    """What a resumed search must share with the interrupted one besides the evolution's settings (the same
    list as before the backends had configs: the unchosen backends' settings at their defaults). Not where the
    fitness runs (`parallel`): a resumed search may use other workers and continues exactly."""
    c = cfg.calibration
    llm = {**{k: d for k, (d, _) in all_settings().items()}, **flatten(cfg.backend_config)}
    return {"model": model_path, "backend": cfg.backend, "dtype": _resolved(cfg)[2],
            "calibration": [c.calib_dataset, c.nsamples, seqlen, c.seed, digest],
            "llm": [llm[k] for k in ("llm_base_url", "llm_model", "llm_grammar", "llm_temperature", "llm_retries")]}


def run_search(cfg: SearchRun, progress: bool = True) -> Run:
    """Run `cfg` and return its record; the structured model, structure.json, the tokenizer, report.json,
    report.md, fitness.png, rates.png, search_state.json and llm_log.jsonl are written into `cfg.output.out`.
    Raises UsageError for bad input, before anything is written."""
    from ..data import calibration_windows
    from ..devices import describe as describe_device
    from ..models import check_fits, context_length, load_model, resolve_model
    from ..selfpruner.driver import describe, self_prune
    from ..structured import struct_spec
    from .placement import place

    cfg.validate()
    ev, c = cfg.evaluation, cfg.calibration
    evals, tasks = ev.names(), ev.zeroshot_tasks()
    _, src = resolve_model(cfg.source.model)
    inputs = cfg.inputs(src)
    out = RunDir.prepare(cfg.output.out, inputs, cfg.output.overwrite)
    state_dir = _state_dir(cfg, out, inputs)
    device, dtype, dtype_name = _resolved(cfg)
    model, tok, model_dir = load_model(cfg.source.model, dtype)
    check_fits(model, cfg.output.save_dtype)  # a float16 save that cannot hold a weight: refused before any work
    out.check_input(model_dir)
    struct_spec(model)
    placement = place(model, device, copies=2)  # the dense model and one shrunk copy at a time
    if cfg.output.overwrite and state_dir.exists():
        shutil.rmtree(state_dir)
    ops = get("search_backend", cfg.backend).fn(cfg.backend_config, describe=describe(model, cfg.source.model),
                                               log_path=state_dir / "llm_log.jsonl")
    seqlen = min(c.seqlen, context_length(model))
    calib = None if cfg.structure.metric == "magnitude-sp" else calibration_windows(tok, c.calib_dataset, c.nsamples,
                                                                                    seqlen, c.seed)
    digest = None if calib is None else tokens_sha256(calib)
    eval_seqlen = min(ev.eval_seqlen, context_length(model))
    ppl_names = [n for n in evals if n != "zeroshot"]
    final_eval = (lambda m: evaluate(m, tok, ev, eval_seqlen, False, names=ppl_names)) if ppl_names else None
    local = model_dir or src
    model_path = str(local) if local else None
    t0 = time.perf_counter()
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = None
    try:
        if cfg.parallel.enabled:
            from ..selfpruner.parallel import Cluster

            cluster = Cluster(cfg.parallel.workers, cfg.parallel.ray_address)
        pruned, rep = self_prune(model, tok, cfg.search, ops, calib, cfg.structure, cfg.fitness,
                                 state_dir / "state.json", cfg.resume, final_eval,
                                 _state_settings(cfg, str(local or cfg.source.model), seqlen, digest), progress,
                                 batch_size=c.batch_size, device=device, cluster=cluster)
    except BaseException:
        if not (state_dir / "state.json").is_file() and not (state_dir / "llm_log.jsonl").is_file():
            shutil.rmtree(state_dir, ignore_errors=True)  # nothing to resume from
        raise
    finally:
        if cluster is not None:
            cluster.close()  # the local cluster stops here, even on error
    details: dict = {"search": rep, "compute_dtype": dtype_name, "device": describe_device(device),
                     "placement": placement}
    if cluster is not None:
        details["ray"] = {"workers": cluster.workers, "threads": cluster.threads, "cpus": cluster.cpus,
                          "gpus": cluster.gpus, "address": cfg.parallel.ray_address}
    record = Run("search", cfg.source.model, model_path, {**cfg.to_dict(), "dtype": dtype_name, "device": str(device)},
                 details=details)
    if calib is not None:
        record.calibration = {"dataset": c.calib_dataset, "nsamples": int(calib.shape[0]),
                              "seqlen": int(calib.shape[1]), "seed": c.seed,
                              "tokens_sha256": digest, "used": True}
    if evals:  # the best candidate's perplexities were just computed among the final k
        rest = [n for n in evals if n == "zeroshot"]
        record.metrics = {**(rep["final"][0].get("eval") or {}),
                          **(evaluate(pruned, tok, ev, eval_seqlen, progress, tasks, names=rest) if rest else {})}
        record.warn_quality(pruned)
    if cfg.bench:
        from ..evaluate.speed import compare

        if device.type != "cpu":  # the speed comparison is a CPU measurement (its prompts are CPU tensors)
            log.info("--bench: measuring on the CPU; moving the dense and the pruned model there")
            model.to("cpu")
            pruned.to("cpu")
        details["speed"] = compare({"dense fp32": model, "model fp32": pruned}, (128, 512), (1,), repeats=3,
                                   progress=progress)
    details["seconds"] = time.perf_counter() - t0
    record.timings = {"importance": rep["importance_seconds"], "search": rep["search_seconds"],
                      "total": details["seconds"]}
    record.finish()
    try:
        _write(cfg, out, record, pruned, tok, state_dir)
    except BaseException:  # the search is not lost: its state stays, and --resume saves it without searching
        if (state_dir / "state.json").is_file():
            log.error("saving to %s failed; the finished search is kept in %s: run the same command "
                      "with --resume to save it without searching again", out.path, state_dir)
        raise
    if not cfg.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    log.info("saved the pruned model to %s", out.path, extra=RESULT)
    return record


def _write(cfg: SearchRun, out: RunDir, record: Run, pruned, tok, state_dir: Path) -> None:
    """The model directory: the structured model, structure.json and tokenizer, then report.json, report.md
    (after the model, so they include the weights' size on disk), the figures and the search's state files."""
    from .. import plots
    from ..outputs import write_text_atomic
    from ..report import search_markdown
    from ..structured.io import write_structured

    run = record.to_dict()
    rep = run["search"]
    s = cfg.search

    def model_writer(d: Path):
        write_structured(pruned, d, {"rates": rep["best_rates"], "metric": cfg.structure.metric,
                                     "gqa": cfg.structure.gqa}, cfg.output.save_dtype)
        rep["weights_mib"] = sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20
        tok.save_pretrained(d)

    figures = {"rates.png": lambda p: plots.structured_rates(rep["best_rates"], s.target_rate, p)}
    if rep["history"]:
        figures["fitness.png"] = lambda p: plots.search_progress(rep["history"], p,
                                                                 f"{cfg.backend} search, mean rate {s.target_rate:g}")
    files = {"report.md": lambda p: write_text_atomic(p, search_markdown(run))}
    for name, copy_as in (("state.json", "search_state.json"), ("llm_log.jsonl", "llm_log.jsonl")):
        if (state_dir / name).is_file():
            files[copy_as] = lambda p, f=state_dir / name: shutil.copy(f, p)
    out.write(run, None, model_writer=model_writer, figures=figures, files=files)
