"""The `sparsellm` command line: one module per subcommand, each with its flags and one `run(args)` that
turns them into a typed config and calls one library function (`sparsellm.runs`).

Bad input gets one line on stderr and exit status 2, before anything is written; Ctrl-C and SIGTERM leave
every output directory complete or absent (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import signal
import sys

from ..errors import UsageError
from . import allocate, bench, demo, eval, finetune, generate, plot_errors, prune, report, search
from .common import Parser

SUBCOMMANDS = (demo, prune, allocate, finetune, search, plot_errors, bench, generate, report, eval)


def build_parser() -> Parser:
    parser = Parser(prog="sparsellm", description="Post-training sparsification of LLMs.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or per-block lines (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _subparser(parser, words: list[str]):
    """The (sub)parser that the leading subcommand words select, e.g. ["eval", "ppl"]."""
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return parser


def _usage(parser) -> str:
    """A short usage line: the required arguments, then [options] and where the full list is."""
    needed = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            needed.append("{" + ",".join(a.choices) + "} ...")
        elif a.required and a.option_strings:
            needed.append(f"{a.option_strings[0]} {a.metavar or a.dest.upper()}")
        elif not a.option_strings and a.nargs != argparse.SUPPRESS:
            needed.append(f"{a.metavar or a.dest.upper()}{' ...' if a.nargs in ('+', '*') else ''}")
    return f"usage: {parser.prog} {' '.join(needed)} [options]   (all options: {parser.prog} --help)"


class _Terminated(KeyboardInterrupt):
    pass


def _terminate(signum, frame):
    raise _Terminated()


class _Formatter(logging.Formatter):
    """The message; a warning or error that does not say so yet gets the `sparsellm: warning: ` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not text.startswith("sparsellm:"):
            text = f"sparsellm: {'warning' if record.levelno == logging.WARNING else 'error'}: {text}"
        return text


def _result_or_warning(record: logging.LogRecord) -> bool:
    """--quiet's filter: warnings and errors, and the lines runs log with extra=runs.record.RESULT."""
    return record.levelno >= logging.WARNING or getattr(record, "result", False)


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
    parser = build_parser()
    words = [x for x in argv if x != "--quiet"]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error (one line)
        if e.code and not [x for x in words if x.startswith("-")]:  # a bare (sub)command: its usage first
            print(_usage(_subparser(parser, words)), file=sys.stderr)
        text = errors.getvalue()
        if e.code:  # an unknown flag is reported by the top parser: point to the subcommand's own --help
            text = text.replace(f"(see {parser.prog} --help)", f"(see {_subparser(parser, words).prog} --help)")
        print(text, end="", file=sys.stderr)
        return int(e.code or 0)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Formatter())
    _quiet_libraries(args.quiet)
    log = logging.getLogger("sparsellm")
    if args.quiet:  # warnings, and the result lines (where a model was saved), nothing else
        log.setLevel(logging.INFO)
        log.addFilter(_result_or_warning)
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
        print("sparsellm: interrupted (an output directory is either complete or absent; a --load lazy prune "
              "continues from OUT.partial with --resume)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        log.removeFilter(_result_or_warning)
        log.setLevel(logging.NOTSET)
