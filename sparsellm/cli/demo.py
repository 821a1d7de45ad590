"""`sparsellm demo`: a few-minute run on the default model that shows what pruning costs: Wanda at 50% with a
small calibration sample, perplexity of the dense and the sparse model on the first WikiText-2 windows.
Nothing is written."""

from __future__ import annotations

from ..config import Calibration, Evaluation, ModelSource
from .common import add_quiet

MODEL = "smollm2-135m"
SETTINGS = {"prune_method": "wanda", "sparsity_ratio": 0.5, "diag_nsamples": 0}
CALIBRATION = {"nsamples": 16, "seqlen": 512}
EVALUATION = {"eval": "wikitext2", "max_windows": 4, "eval_dense": True}
HELP = (f"a short demo: prune {MODEL} with Wanda at 50% ({CALIBRATION['nsamples']} C4 windows of "
        f"{CALIBRATION['seqlen']} tokens) and print dense vs sparse WikiText-2 perplexity on the first "
        f"{EVALUATION['max_windows']} windows of 2048 tokens; writes nothing")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP.replace("%", "%%"), description=HELP)
    p.add_argument("--model", default=MODEL, help="HF hub id, local HF directory, .gguf file or preset")
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..pipeline import PruneConfig
    from ..report import terminal
    from ..runs.prune import PruneRun, run_prune

    config = PruneConfig(**SETTINGS, calibration=Calibration(**CALIBRATION))
    record = run_prune(PruneRun(ModelSource(args.model), config, Evaluation(**EVALUATION)),
                       progress=not args.quiet)
    print(terminal(record.to_dict()))
    return 0
