"""`sparsellm eval ppl` and `sparsellm eval zeroshot`: evaluate one model."""

from __future__ import annotations

from ..config import Evaluation, ModelSource
from .common import OneSpelling, Parser, add_config, add_quiet, config_from

ZEROSHOT = ("tasks", "limit", "zeroshot_batch_size", "hellaswag_file")


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model")
    add_quiet(e)
    esub = e.add_subparsers(dest="eval_command", required=True, parser_class=Parser)
    ppl = esub.add_parser("ppl", help="perplexity by the papers' protocol")
    add_config(ppl.add_argument_group("model"), ModelSource(), helps={"dtype": "dtype of the model for evaluation"},
               required=("model",))
    group = ppl.add_argument_group("evaluation")
    group.add_argument("--dataset", dest="eval", default="wikitext2", help="comma-separated: wikitext2, c4")
    add_config(group, Evaluation(), skip=("eval", "eval_dense", *ZEROSHOT), one_spelling=("eval_seqlen",))
    group.add_argument("--seqlen", dest="eval_seqlen", type=int, action=OneSpelling, help="alias of --eval_seqlen (here only: elsewhere "
                       "--seqlen is the calibration window)")
    _output(ppl)
    zs = esub.add_parser("zeroshot", help="zero-shot accuracy with lm-evaluation-harness on the bundled tasks")
    add_config(zs.add_argument_group("model"), ModelSource(), helps={"dtype": "dtype of the model for evaluation"},
               required=("model",))
    group = zs.add_argument_group("evaluation")
    add_config(group, Evaluation(), skip=("eval", "eval_seqlen", "max_windows", "eval_dense", "eval_batch_size",
                                          "zeroshot_batch_size"))
    group.add_argument("--batch_size", dest="zeroshot_batch_size", type=int, default=8, metavar="N",
                       help="zero-shot batch size")
    _output(zs)
    for p in (ppl, zs):
        add_quiet(p)
        p.set_defaults(run=run)


def _output(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--save", default=None, help="directory to write report.json into; the model's own run "
                   "directory (--model RUN --save RUN) adds the results to that run's report.json and report.md")
    g.add_argument("--overwrite", action="store_true", help="with --save RUN: replace a result already in the "
                   "run's record; with another --save directory: replace the run record (report.json) it holds")


def run(args) -> int:
    from ..runs.eval import EvalRun, run_eval

    evaluation = config_from(args, Evaluation)
    record = run_eval(EvalRun(config_from(args, ModelSource), evaluation, args.eval_command, args.save,
                              args.overwrite), progress=not args.quiet)
    print(record.summary())
    if record.details.get("added_to"):
        print(f"added to {record.details['added_to']}")
    return 0
