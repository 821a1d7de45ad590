"""`sparsellm allocate`: layer-wise sparsity rates (ATP with --search, OWL, RMI, ...) recorded (rates.json with --save),
then pruning and evaluation with them."""

from __future__ import annotations

from ..allocate.atp_search import ATPSearchConfig
from .common import add_config, add_quiet, config_from
from .prune import add_flags, prune_run

HELP = ("layer-wise sparsity rates (ATP with --search, OWL, RMI, ...), in the run record (and as rates.json in "
        "--save DIR, ready for --allocation file:DIR/rates.json); then prune and "
        "evaluate with them")


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help=HELP)
    add_flags(p)
    search = p.add_argument_group("ATP search")
    search.add_argument("--search", action="store_true",
                        help="ATP: search β on the grid 0, --atp_step, ... < β_max (--atp_search) and keep the β "
                             "with the lowest objective; with --allocation atp_dlp, β and α jointly within the same trial budget")
    add_config(search, ATPSearchConfig())
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..report import terminal
    from ..runs.prune import run_prune

    search = config_from(args, ATPSearchConfig) if args.search else None
    record = run_prune(prune_run(args, "allocate", search), progress=not args.quiet)
    print(terminal(record.to_dict()))
    return 0
