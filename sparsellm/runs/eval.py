"""`run_eval`: evaluate one model (what `sparsellm eval ppl` / `eval zeroshot` do), config in, record out."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_weights
from ..compare import load_run
from ..config import Evaluation, ModelSource, check_finite
from ..errors import UsageError
from .record import Run, evaluate, place_for_eval
from .rundir import RunDir, add_to_record, check_additions, run_record


@dataclass
class EvalRun:
    """Perplexity ("ppl": `evaluation.eval` lists wikitext2 and/or c4) or zero-shot accuracy ("zeroshot":
    `evaluation.tasks`) of one model; `save`: a directory to write report.json into, or the model's own run
    directory, whose record (report.json, report.md) the results are then added to; `overwrite`: replace
    results already in that record. `source.device` / `source.dtype` say where and in what the forwards run;
    `source.load` lazy (or auto picking lazy) scores perplexity block by block from the checkpoint's shards;
    zero-shot of such a model, or of one larger than the device, runs whole on accelerate's device map
    (GPUs, CPU memory, disk: `evaluate.offload`)."""

    source: ModelSource = field(default_factory=ModelSource)
    evaluation: Evaluation = field(default_factory=Evaluation)
    kind: str = "ppl"
    save: str | None = None
    overwrite: bool = False

    def validate(self) -> "EvalRun":
        """Raises UsageError for bad settings, before any model is loaded."""
        check_finite(self)
        self.source.validate()
        if self.kind == "zeroshot":
            self.evaluation.eval = "zeroshot"
        elif self.kind != "ppl":
            raise UsageError(f"unknown evaluation kind {self.kind!r}; choose ppl or zeroshot")
        names = self.evaluation.names(zeroshot_ok=self.kind == "zeroshot")
        if not names:
            raise UsageError("--dataset none leaves nothing to evaluate; choose wikitext2 and/or c4")
        self.evaluation.validate()
        return self


def run_eval(cfg: EvalRun, progress: bool = True) -> Run:
    """Load the model, evaluate it, and write `report.json` into `cfg.save` if given; when `cfg.save` is the
    model's own run directory, add the results to its record instead (`details["added_to"]`). The model is
    read lazily (`--load`) or loaded whole; on a CUDA device it is moved there when it fits, else scored
    block by block, or for zero-shot run on an accelerate device map (`record.place_for_eval`). The record's
    config holds the resolved device and dtype. Raises UsageError, before any evaluation and with nothing
    written (a CUDA device where there is none); NonFiniteError for a NaN/inf weight, naming the module (a
    lazy model's blocks are checked as they are read: for zero-shot in one pass before it), or a non-finite
    loss."""
    from ..models import context_length, load_model, resolve_model
    from ..models.load import load_lazy, wants_lazy
    from ..models.save import dtype_name

    cfg.validate()
    device, dtype = cfg.source.resolve()
    _, src = resolve_model(cfg.source.model)
    lazy = wants_lazy(cfg.source.load, cfg.source.model, dtype)
    run_dir = run_record(cfg.save, src)
    if run_dir is not None and cfg.kind == "zeroshot":
        check_additions(run_dir, ["zeroshot"], cfg.overwrite)
    save = RunDir.prepare(cfg.save, [src], cfg.overwrite, replaces=False) if run_dir is None else None
    if save is not None:
        save.refuse_replacing_record()
    tasks = cfg.evaluation.zeroshot_tasks()
    model, tok, model_dir = (load_lazy if lazy else load_model)(cfg.source.model, dtype)
    check_weights(model)  # a lazy model's blocks: by `visit`, as they are read
    seqlen = None if tasks else min(cfg.evaluation.eval_seqlen, context_length(model))
    if run_dir is not None and seqlen is not None:
        check_additions(run_dir, [f"{n}_ppl@{seqlen}" for n in cfg.evaluation.names()], cfg.overwrite)
    logits = 3 * 4 * cfg.evaluation.eval_batch_size * (seqlen or 2048) * model.config.vocab_size
    placement = place_for_eval(model, device, reserve=logits, whole=cfg.kind == "zeroshot")
    local = model_dir or src
    record = Run(f"eval {cfg.kind}", cfg.source.model, str(local) if local else None,
                 {"dtype": dtype_name(dtype), "device": str(device), "load": "lazy" if lazy else "memory",
                  **vars(cfg.evaluation)})
    record.details["placement"] = placement
    counts: dict = {}
    if lazy and cfg.kind == "zeroshot":  # lm-eval reads the blocks through accelerate: check and count them first
        _visit_blocks(model, _block_visitor(model, counts))
    record.metrics = evaluate(model, tok, cfg.evaluation, seqlen, progress, tasks,
                              visit=_block_visitor(model, counts) if lazy else None)
    record.details["evaluated"] = _evaluated(model, model_dir, counts if lazy else None)
    run = load_run(run_dir)[0] if run_dir is not None else {}  # its dense results and prune report, if any
    record.warn_quality(model, run.get("prune"), run.get("eval_dense") or {})
    record.finish()
    if save is not None:
        save.write(record.to_dict())
    if run_dir is not None:
        add_to_record(run_dir, record.metrics, {"command": record.command, "config": record.config,
                                                "versions": record.versions, "peak_rss_mib": record.peak_rss_mib},
                      cfg.overwrite, record.warnings)
        record.details["added_to"] = str(run_dir / "report.json")
    return record


def _visit_blocks(model, visit) -> None:
    """visit(i, block) for each block of a lazy model, read from its shards one at a time onto the CPU."""
    from ..models import get_blocks
    from ..onload import Onloader

    on = Onloader(model, "cpu")
    for i in range(len(get_blocks(model))):
        try:
            visit(i, on.block(i))
        finally:
            on.release(i)


def _block_visitor(model, counts: dict):
    """visit(i, block) for a lazy model's evaluation: block i's weights finite (else NonFiniteError naming the
    module), and its linears' zeros and weights into counts[i]."""
    from ..checks import check_tensor
    from ..models import block_linears, get_arch

    prefix = get_arch(model).blocks

    def visit(i, block):
        for name, p in block.named_parameters():
            module, _, param = name.rpartition(".")
            check_tensor(p.detach(), f"{prefix}.{i}.{module}", param)
        linears = block_linears(model, block).values()
        counts[i] = (sum(int((lin.weight == 0).sum()) for lin in linears), sum(lin.weight.numel() for lin in linears))

    return visit


def _evaluated(model, model_dir, counts: dict | None = None) -> dict:
    """What the evaluated model is, for `sparsellm report`: its measured block-linear sparsity (from
    `counts`, {block: (zeros, weights)} of the blocks read, for a lazy model), and what its
    `sparsity_config.json` says (method, target, pattern, allocation), when it has a readable one."""
    from ..adapt.pruned_input import read_sidecar
    from ..engine import linear_sparsity

    if counts is None:
        measured = linear_sparsity(model)
    else:
        zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
        measured = {"zeros": zeros, "params": total, "sparsity": zeros / total if total else 0.0}
    out = {"measured": measured}
    try:
        side = read_sidecar(model_dir) or {}
    except UsageError:
        side = {}
    if side:
        out.update(method=side.get("method"), target_sparsity=side.get("target_sparsity"),
                   sparsity_type=side.get("sparsity_structure"),
                   allocation={"name": (side.get("allocation") or {}).get("name"),
                               "rates": (side.get("allocation") or {}).get("rates")})
    return out
