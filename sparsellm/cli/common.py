"""What every subcommand shares: the parser class (one-line errors, defaults in --help) and flags built
from config dataclasses, so a flag's default and help are the config field's."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say it and there is a value to show."""

    def _get_help_string(self, action):
        d = action.default  # by identity: 0 and 0.0 are real defaults, though 0 == False
        if "default" in (action.help or "") or d is None or d is False or d is argparse.SUPPRESS or d == "":
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as every other bad input, and each default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--save` must never silently mean `--save_model`
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"sparsellm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class OneSpelling(argparse._StoreAction):
    """A flag with several spellings (`--out` / `--save_model`): giving two of them with different values is
    an error, not "the last one wins"."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_spelled", {})
        before = seen.get(self.dest)
        if before is not None and before[0] != option_string and before[1] != values:
            parser.error(f"{before[0]} and {option_string} are the same setting; give it once")
        seen[self.dest] = (option_string, values)
        setattr(namespace, self.dest, values)


def finite_float(text: str) -> float:
    """argparse type of every float setting: a finite number (NaN and ±inf are refused at parse time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _flag_type(hint):
    """int | None -> int; float -> finite_float; bool stays bool."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    typ = args[0] if args else hint
    return finite_float if typ is float else typ


def add_config(group, config, skip=(), required=(), helps: dict | None = None, one_spelling=()) -> list[str]:
    """Add one flag per field of the dataclass instance `config` that was declared with `config.setting`
    (`--name` plus its aliases), with the instance's values as defaults. `skip`: fields left out;
    `required`: fields that must be given; `helps`: {field: help} for this subcommand; `one_spelling`: fields
    that get another spelling elsewhere (refused if both are given). Returns the names."""
    hints = typing.get_type_hints(type(config))
    added = []
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta or f.name in skip or meta.get("flag") == "":
            continue
        flags = [meta.get("flag") or f"--{f.name}", *meta.get("aliases", ())]
        kw = {"dest": f.name, "help": (helps or {}).get(f.name, meta["help"])}
        typ = _flag_type(hints[f.name])
        if typ is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=typ, default=getattr(config, f.name))
            if len(flags) > 1 or f.name in one_spelling:
                kw["action"] = OneSpelling
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        if f.name in required:
            kw.pop("default", None)
            kw["required"] = True
        group.add_argument(*flags, **kw)
        added.append(f.name)
    return added


def config_from(args, cls, **fixed):
    """An instance of dataclass `cls` from the parsed flags of its fields (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **fixed})


def add_quiet(parser) -> None:
    """`sparsellm SUB --quiet` works like `sparsellm --quiet SUB` (SUPPRESS keeps the global value)."""
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or per-block lines (same as sparsellm --quiet)")
