"""`sparsellm bench`: measured inference speed of a model against its dense baseline, in one process."""

from __future__ import annotations

import dataclasses
import sys

from ..runs.bench import BenchRun
from .common import add_config, add_quiet, config_from


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measured inference speed of a model against its dense baseline, in one process")
    fields = [f.name for f in dataclasses.fields(BenchRun)]
    groups = {"model": ("model", "baseline", "kernels", "values", "device", "backend"), "DeepSparse": ("deepsparse", "deepsparse_python"),
              "output": ("save",)}
    groups["measurement"] = tuple(f for f in fields if not any(f in g for g in groups.values()))
    for title in ("model", "measurement", "DeepSparse", "output"):
        add_config(p.add_argument_group(title), BenchRun(), skip=set(fields) - set(groups[title]), required=("model",))
    add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..report import speed_table
    from ..runs.bench import run_bench

    record = run_bench(config_from(args, BenchRun), progress=not args.quiet)
    res = record.details["speed"]
    print(f"device: {res['device']}", file=sys.stderr)
    print(speed_table(res))
    return 0
