"""`sparsellm report`: several runs side by side, as one markdown table and PNG plots."""

from __future__ import annotations

from .common import add_quiet


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="put several runs side by side: one markdown table and PNG plots")
    p.add_argument("runs", nargs="+", help="run directories (--out or --save) or their report.json")
    p.add_argument("--out", default=None, help="directory for report.md, ppl_vs_sparsity.png and rates.png")
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..compare import compare_runs

    print(compare_runs(args.runs, args.out))
    return 0
