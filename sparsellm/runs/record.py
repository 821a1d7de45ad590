"""The run record: one shape for every kind of run (prune, allocate, finetune, search, eval, bench).

    record = run_prune(cfg)           # or run_finetune / run_search / run_eval / run_bench
    record.metrics                    # {"wikitext2_ppl@2048": {"ppl", "windows", "tokens", ...}, "zeroshot": {...}}
    record.to_dict()                  # what report.json holds; `sparsellm report` and plot-errors read it

`to_dict` keeps the method-specific sections (`prune`, `allocation`, `search`, `finetune`, `speed`) at the
top level, where report readers have always found them, next to the common fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..provenance import peak_rss_mib, versions

log = logging.getLogger("sparsellm")


@dataclass
class Run:
    """One run. command: "prune", "allocate", "finetune", "search", "eval ppl", "eval zeroshot", "bench".
    model / model_path: the model as given and the local directory it resolved to (None for a hub id).
    config: the flat settings. calibration: dataset, nsamples, seqlen, seed, token hash (None when no
    calibration was drawn). metrics / metrics_dense: evaluation results after the run / of the input model.
    blocks: the per-block table (target, measured sparsity, local and cumulative error, seconds).
    timings: seconds by phase. peak_rss_mib: the process's peak memory. details: the method's own sections.
    warnings: quality warnings (`checks.block_warnings`, `checks.ppl_warnings`), also logged to stderr."""

    command: str
    model: str
    model_path: str | None = None
    config: dict = field(default_factory=dict)
    calibration: dict | None = None
    metrics: dict = field(default_factory=dict)
    metrics_dense: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    versions: dict = field(default_factory=versions)
    details: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def finish(self) -> "Run":
        """Record the peak memory at the end of the run."""
        self.peak_rss_mib = peak_rss_mib()
        return self

    def to_dict(self) -> dict:
        out = {"command": self.command, "model": self.model, "model_path": self.model_path, "config": self.config,
               **self.details}
        if self.metrics_dense:
            out["eval_dense"] = self.metrics_dense
        if self.metrics or self.command.startswith("eval"):
            out["eval"] = self.metrics
        out.update(calibration=self.calibration, blocks=self.blocks, timings=self.timings,
                   peak_rss_mib=self.peak_rss_mib, versions=self.versions, warnings=self.warnings)
        return out

    def warn_quality(self, model, prune_report: dict | None = None, dense: dict | None = None) -> None:
        """Log and keep `checks.ppl_warnings` for this run's perplexities against `dense` (default its own
        metrics_dense), the model's vocabulary size, and the `prune_report` that names the likely cause."""
        from ..checks import ppl_warnings

        for w in ppl_warnings(self.metrics, self.metrics_dense if dense is None else dense,
                              getattr(model.config, "vocab_size", None), prune_report):
            log.warning("sparsellm: warning: %s", w)
            self.warnings.append(w)

    def summary(self) -> str:
        """The terminal summary (report.summary_table)."""
        from ..report import summary_table

        return summary_table(self.to_dict())

    def markdown(self) -> str:
        """report.md (report.markdown)."""
        from ..report import markdown

        return markdown(self.to_dict())


RESULT = {"result": True}  # log.info(..., extra=RESULT): a line `--quiet` still shows (where a model was saved)


def block_rows(prune_report: dict | None) -> list[dict]:
    """The per-block table of a prune report, without the per-module detail."""
    keys = ("block", "target", "measured", "rel_error", "cum_error", "seconds")
    return [{k: b.get(k) for k in keys} for b in (prune_report or {}).get("blocks", [])]


def evaluate(model, tokenizer, evaluation, seqlen: int | None, progress: bool = True, tasks=None,
             names: list[str] | None = None, visit=None) -> dict:
    """Score `model` on `evaluation.names()` (or `names`): perplexity at `seqlen` tokens per window on
    the first `max_windows` windows, `eval_batch_size` windows per forward (block by block for a model whose
    blocks are not all resident: `evaluate.blockwise`; `visit(i, block)` is then called while block i is on
    the device), and zero-shot accuracy on `tasks` (validated zero-shot tasks; a model whose blocks are not
    all resident runs whole on an accelerate device map: `zeroshot_any`). Returns {metric name: result}."""
    from ..evaluate import perplexity

    out = {}
    for name in evaluation.names() if names is None else names:
        if name == "zeroshot":
            r = zeroshot_any(model, tokenizer, evaluation, tasks, progress)
            log.info("zero-shot mean acc = %.4f over %s", r["mean_acc"], ", ".join(r["tasks"]))
            out["zeroshot"] = r
            continue
        r = perplexity(model, tokenizer, name, seqlen, evaluation.max_windows, progress=progress,
                       batch_size=evaluation.eval_batch_size, visit=visit)
        log.info("%s = %.3f (%d windows, %d tokens%s)", r["metric"], r["ppl"], r["windows"], r["tokens"],
                 ", block by block" if r["blockwise"] else "")
        out[r["metric"]] = r
    return out


def zeroshot_any(model, tokenizer, evaluation, tasks=None, progress: bool = True,
                 max_memory: dict | None = None) -> dict:
    """`evaluate.zeroshot` of `model` wherever it lives: as it is when its weights are all where it computes,
    else (a lazy model, or an in-memory one with an onloader for another device: `blockwise.is_blockwise`)
    whole on accelerate's device map for the onloader's device (`evaluate.offload.dispatched`: several GPUs,
    then CPU memory, then disk; max_memory: accelerate's {GPU index or "cpu": bytes}, default from the free
    memory). The result's settings then hold "device_map": {device: modules}. Raises UsageError as
    `zeroshot` and `dispatched` do."""
    from ..evaluate.blockwise import is_blockwise
    from ..evaluate.zeroshot import zeroshot
    from ..onload import onloader

    args = (tokenizer, list(tasks or evaluation.zeroshot_tasks()), evaluation.limit, evaluation.zeroshot_batch_size,
            evaluation.hellaswag_file)
    if not is_blockwise(model):
        return zeroshot(model, *args, progress=progress)
    from ..evaluate.offload import dispatched
    from ..models import context_length

    logits = 2 * 4 * evaluation.zeroshot_batch_size * min(context_length(model), 2048) * model.config.vocab_size
    with dispatched(model, onloader(model).device, max_memory, reserve=logits) as (m, info):
        r = zeroshot(m, *args, progress=progress, device=info["device"])
    r["settings"]["device_map"] = info["device_map"]
    return r


def place_for_eval(model, device, reserve: int = 0, whole: bool = False) -> str:
    """Put `model` where its evaluation runs on `device` (a torch.device) and say how it will run:
    "resident" (every weight on `device`: an in-memory model already there, or moved there whole because
    it fits next to `reserve` bytes, as `devices.free_bytes` estimates), "blockwise" (a lazy model, or an
    in-memory one too large for the device: an onloader is attached and the blocks visit the device one at
    a time) or, when `whole` (zero-shot: lm-eval runs the whole model), "device_map" for those same models
    (an onloader is attached for `device`; `zeroshot_any` then dispatches the model with accelerate)."""
    import torch

    from ..onload import attach, fits_on_device, onloader

    device = torch.device(device)
    if onloader(model).lazy is not None:
        attach(model, device)
        return "device_map" if whole else "blockwise"
    home = next(model.parameters()).device
    if home == device:
        return "resident"
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if fits_on_device(device, nbytes, reserve):
        model.to(device)
        return "resident"
    log.info("the model (%.2f GiB) does not fit on %s: evaluating %s", nbytes / 2**30, device,
             "on an accelerate device map" if whole else "block by block")
    attach(model, device)
    return "device_map" if whole else "blockwise"
