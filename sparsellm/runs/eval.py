"""`run_eval`: evaluate one model (what `sparsellm eval ppl` / `eval zeroshot` do), config in, record out."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Evaluation, ModelSource, check_finite
from ..errors import UsageError
from .record import Run, evaluate
from .rundir import RunDir


@dataclass
class EvalRun:
    """Perplexity ("ppl": `evaluation.eval` lists wikitext2 and/or c4) or zero-shot accuracy ("zeroshot":
    `evaluation.tasks`) of one model; `save`: a directory to write report.json into."""

    source: ModelSource = field(default_factory=ModelSource)
    evaluation: Evaluation = field(default_factory=Evaluation)
    kind: str = "ppl"
    save: str | None = None

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
    """Load the model, evaluate it, and write `report.json` into `cfg.save` if given. Raises UsageError."""
    from ..models import context_length, load_model, resolve_model

    cfg.validate()
    _, src = resolve_model(cfg.source.model)
    save = RunDir.prepare(cfg.save, [src], replaces=False)
    tasks = cfg.evaluation.zeroshot_tasks()
    model, tok, model_dir = load_model(cfg.source.model, cfg.source.torch_dtype())
    seqlen = None if tasks else min(cfg.evaluation.eval_seqlen, context_length(model))
    local = model_dir or src
    record = Run(f"eval {cfg.kind}", cfg.source.model, str(local) if local else None,
                 {"dtype": cfg.source.dtype, **vars(cfg.evaluation)})
    record.metrics = evaluate(model, tok, cfg.evaluation, seqlen, progress, tasks)
    record.finish()
    if save is not None:
        save.write(record.to_dict())
    return record

