"""`sparsellm plot-errors`: the per-block reconstruction errors of one or more runs on one figure."""

from __future__ import annotations

from .common import add_quiet


def add_parser(sub) -> None:
    p = sub.add_parser("plot-errors", help="draw the per-block reconstruction errors of one or more runs on one "
                       "figure (PNG)")
    p.add_argument("reports", nargs="+", help="report.json files written by prune/allocate (--out or --save)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per report")
    p.add_argument("--title", default="", help="figure title")
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..plots import plot_reports

    print(plot_reports(args.reports, args.out, args.labels.split(",") if args.labels else None, args.title))
    return 0
