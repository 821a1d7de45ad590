"""The `sparsellm` command line: one module per subcommand, each with its flags and one `run(args)` that
turns them into a typed config and calls one library function (`sparsellm.runs`).

Bad input gets one line on stderr and exit status 2, before anything is written; Ctrl-C and SIGTERM leave
every output directory complete or absent (exit 130 / 143).
"""

from __future__ import annotations

import logging
import signal
import sys

from ..errors import UsageError
from . import allocate, bench, eval, finetune, plot_errors, prune, report, search
from .common import Parser

SUBCOMMANDS = (prune, allocate, finetune, search, plot_errors, bench, report, eval)


def build_parser() -> Parser:
    parser = Parser(prog="sparsellm", description="Post-training sparsification of LLMs.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or per-block lines (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def _quiet_libraries(quiet: bool) -> None:
    import huggingface_hub.utils.logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # after import: both libraries reset their loggers when imported
    hub_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if quiet:
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if [x for x in argv if x != "--quiet"] == ["prune"]:
        print("sparsellm: no arguments given, running the demo: sparsellm prune " + " ".join(prune.DEMO),
              file=sys.stderr)
        argv = argv + prune.DEMO
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error already printed as one line
        return int(e.code or 0)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    _quiet_libraries(args.quiet)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            return args.run(args)
    except UsageError as e:
        print(f"sparsellm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print("sparsellm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("sparsellm: interrupted (an output directory is either complete or absent)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
