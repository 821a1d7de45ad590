"""Every numeric flag of every subcommand is checked before any work: NaN, ±inf and values outside a
setting's range exit with status 2 and one line, and the model is never loaded (the loader is replaced by
one that fails the test)."""

from __future__ import annotations

import argparse
import math

import pytest

from sparsellm.cli import build_parser, main
from sparsellm.registry import get, names
from test_cli_bad_input import _argv, _check

SUBCOMMANDS = ("prune", "allocate", "finetune", "search", "eval ppl", "eval zeroshot", "bench")


def _subparser(sub: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in sub.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


def _parses(convert, text: str) -> bool:
    try:
        convert(text)
        return True
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def float_flags(sub: str) -> list[str]:
    """Flags that take a real number: they accept "0.5" and refuse "abc" (int flags refuse "0.5", str flags
    accept "abc"). Found from the parser itself, so a new float setting is covered without editing this test."""
    out = []
    for a in _subparser(sub)._actions:
        if a.option_strings and a.nargs is None and a.type is not None and not a.choices \
                and _parses(a.type, "0.5") and not _parses(a.type, "abc"):
            out.append(a.option_strings[0])
    return out


def _owner_flags(sub: str) -> dict[str, list[str]]:
    """{setting: the flags that choose the method owning it}, so the value is really used, not refused as a
    setting of a method that was not chosen."""
    choose = {"prune": {"pruner": "--prune_method", "allocator": "--allocation"},
              "allocate": {"pruner": "--prune_method", "allocator": "--allocation"},
              "finetune": {"pruner": "--prune_method", "finetune": "--method"},
              "search": {"search_backend": "--backend"}}.get(sub, {})
    out = {}
    for kind, flag in choose.items():
        for name in names(kind):
            cfg = get(kind, name).config
            extra = ["--llm_base_url", "http://127.0.0.1:9/v1"] if name == "openai" else []
            stack = [cfg]
            while stack:
                c = stack.pop()
                for f in c.__dataclass_fields__.values():
                    factory = f.default_factory
                    if isinstance(factory, type) and hasattr(factory, "__dataclass_fields__"):
                        stack.append(factory)
                    else:
                        out.setdefault(f.name, [flag, name, *extra])
    out["atp_step"] = ["--allocation", "atp", "--search"]
    return out


CASES = [(sub, flag) for sub in SUBCOMMANDS for flag in float_flags(sub)]


def test_the_float_flags_are_found():
    found = {flag for _, flag in CASES}
    assert {"--rmi_beta", "--owl_m", "--percdamp", "--sparsity_ratio", "--lr", "--target_rate",
            "--llm_temperature", "--atp_step"} <= found, found


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A hub-shaped model id that is never loaded (the loader fails the test) and a small calibration file."""
    import sparsellm.models
    import sparsellm.models.load

    def fail(*_, **__):
        raise AssertionError("the model was loaded before the flags were checked")

    for mod in (sparsellm.models, sparsellm.models.load):
        monkeypatch.setattr(mod, "load_model", fail)
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text\n" * 50)
    return {"model": "org/never-loaded", "calib": str(calib), "out": str(tmp_path / "out"), "root": tmp_path}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("sub,flag", CASES)
def test_a_non_finite_number_is_refused_before_loading(capsys, env, sub, flag, value):
    owner = _owner_flags(sub).get(flag.lstrip("-"), [])
    argv = _argv(sub, env["model"], env["calib"], env["out"]) + owner + [flag, value]
    if sub == "finetune" and owner[:2] == ["--method", "losa"]:
        argv += ["--ft_nsamples", "8"]
    err = _check(capsys, env["root"], argv)
    assert flag in err, err


def test_nan_is_refused_by_the_library_too():
    """The Python API validates the same way (no command line in between)."""
    from sparsellm import PruneConfig
    from sparsellm.errors import UsageError

    for flat in ({"allocation": "rmi", "rmi_beta": math.nan}, {"allocation": "owl", "owl_m": math.inf},
                 {"prune_method": "sparsegpt", "percdamp": math.nan}, {"allocation": "atp", "atp_beta": math.nan}):
        with pytest.raises(UsageError):
            PruneConfig.from_flat(**flat).validate()


def test_a_bad_number_is_a_flag_error(capsys):
    assert main(["prune", "--model", "x", "--percdamp", "nan"]) == 2
    assert "--percdamp" in capsys.readouterr().err
