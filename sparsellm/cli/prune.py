"""`sparsellm prune`: prune a model (`sparsellm demo` is a short run on the default model)."""

from __future__ import annotations

import dataclasses

from ..config import Calibration, Evaluation, ModelSource, Output
from ..errors import UsageError
from ..pipeline import PruneConfig
from ..registry import get, names
from .common import add_config, add_quiet, config_from

HELP = "prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M; layer-wise rates)"
METHOD_KINDS = ("pruner", "allocator")


def add_flags(p) -> None:
    """Every flag of `prune` (and of `allocate`, which adds its search flags), in groups."""
    add_config(p.add_argument_group("model"), ModelSource(), required=("model",))
    add_config(p.add_argument_group("calibration"), Calibration())
    method = p.add_argument_group("method")
    add_config(method, PruneConfig())
    method.add_argument("--prunen", type=int, default=None, help="alias: N of an N:M pattern (with --prunem)")
    method.add_argument("--prunem", type=int, default=None, help="alias: M of an N:M pattern (with --prunen)")
    seen = set()
    for kind in METHOD_KINDS:
        for name in names(kind):
            cfg = get(kind, name).config()
            seen.update(add_config(method, cfg, skip=seen))
    add_config(p.add_argument_group("evaluation"), Evaluation())
    output = p.add_argument_group("output")
    add_config(output, Output())
    output.add_argument("--resume", action="store_true",
                        help="continue an interrupted streamed prune (--load lazy) from its last finished block, "
                             "with the same settings and model (kept in OUT.partial); the result is identical")


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help=HELP)
    add_flags(p)
    add_quiet(p)
    p.set_defaults(run=run)


def prune_config(args) -> PruneConfig:
    """PruneConfig from the flags (`from_flat` refuses another method's setting given a non-default value)."""
    if args.prunen is not None or args.prunem is not None:
        if args.prunen is None or args.prunem is None:
            raise UsageError("--prunen and --prunem go together")
        args.sparsity_type = f"{args.prunen}:{args.prunem}"
    flat = {f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig) if hasattr(args, f.name)}
    flat.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Calibration)})
    for kind in METHOD_KINDS:
        for name in names(kind):
            flat.update({f: getattr(args, f) for f in get(kind, name).field_names() if hasattr(args, f)})
    return PruneConfig.from_flat(**flat)


def prune_run(args, command: str = "prune", search=None):
    from ..runs.prune import PruneRun

    return PruneRun(config_from(args, ModelSource), prune_config(args), config_from(args, Evaluation),
                    config_from(args, Output), search, command, resume=args.resume)


def run(args) -> int:
    from ..report import terminal
    from ..runs.prune import run_prune

    from ..distributed import is_main

    record = run_prune(prune_run(args), progress=not args.quiet)
    if is_main():  # under torchrun, one summary
        print(terminal(record.to_dict()))
    return 0
