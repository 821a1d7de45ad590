"""Every subcommand, the same three bad inputs: a missing model, an existing non-empty output directory and an
out-of-range rate (or count). Each must give exit status 2, exactly one line 'sparsellm: error: ...' on stderr,
and leave the file tree exactly as it was."""

from __future__ import annotations

import pytest

from sparsellm.cli import main
from test_cli import _assert_one_line_error, _tree

SMALL = ["--nsamples", "2", "--seqlen", "16", "--eval", "none"]


def _argv(sub: str, model: str, calib: str, out: str) -> list[str]:
    """A valid command line of `sub` (it would run), writing to `out`."""
    base = {
        "prune": ["prune", "--model", model, "--calib_dataset", calib, *SMALL, "--out", out],
        "allocate": ["allocate", "--model", model, "--calib_dataset", calib, *SMALL, "--allocation", "atp",
                     "--atp_beta", "0.01", "--out", out],
        "finetune": ["finetune", "--model", model, "--calib_dataset", calib, *SMALL, "--data", calib,
                     "--ft_nsamples", "2", "--ft_seqlen", "16", "--method", "none", "--out", out],
        "search": ["search", "--model", model, "--calib_dataset", calib, *SMALL, "--backend", "uniform",
                   "--out", out],
        "eval ppl": ["eval", "ppl", "--model", model, "--max_windows", "1", "--save", out],
        "eval zeroshot": ["eval", "zeroshot", "--model", model, "--tasks", "rte", "--limit", "1", "--save", out],
        "bench": ["bench", "--model", model, "--baseline", model, "--save", out],
    }[sub]
    return ["--quiet", *base]


RATE = {  # the out-of-range value of each subcommand's rate or count
    "prune": ["--sparsity_ratio", "1.5"],
    "allocate": ["--sparsity_ratio", "-0.2"],
    "finetune": ["--sparsity_ratio", "1.0"],
    "search": ["--target_rate", "1.5"],
    "eval ppl": ["--max_windows", "0"],
    "eval zeroshot": ["--limit", "0"],
    "bench": ["--repeats", "0"],
}
REPLACES = ("prune", "allocate", "finetune", "search")  # write a whole model directory: refuse a non-empty one


def _check(capsys, root, argv):
    before = _tree(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert code == 2, err
    assert _tree(root) == before, "something was written"
    return err


@pytest.fixture
def env(tmp_path, saved_model_dir, calib_txt):
    return {"model": str(saved_model_dir), "calib": str(calib_txt), "out": str(tmp_path / "out"), "root": tmp_path}


@pytest.mark.parametrize("sub", list(RATE))
def test_missing_model(capsys, env, sub):
    argv = _argv(sub, str(env["root"] / "no" / "such" / "model"), env["calib"], env["out"])
    assert "not found" in _check(capsys, env["root"], argv)


@pytest.mark.parametrize("sub", REPLACES)
def test_existing_nonempty_output(capsys, env, sub):
    out = env["root"] / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = _check(capsys, env["root"], _argv(sub, env["model"], env["calib"], env["out"]))
    assert "not empty" in err and "--overwrite" in err


@pytest.mark.parametrize("sub", list(RATE))
def test_out_of_range_rate(capsys, env, sub):
    _check(capsys, env["root"], _argv(sub, env["model"], env["calib"], env["out"]) + RATE[sub])


@pytest.mark.parametrize("argv", [["report", "{root}/no-run"], ["plot-errors", "{root}/no-report.json", "--out",
                                                                  "{root}/e.png"]])
def test_tools_over_runs_missing_input(capsys, env, argv):
    _check(capsys, env["root"], ["--quiet", *(a.format(root=env["root"]) for a in argv)])


@pytest.mark.parametrize("argv", [
    ["prune", "--model", "{model}", "--calib_dataset", "{calib}", *SMALL, "--save_mod", "{out}"],  # no abbreviations
    ["search", "--model", "{model}", "--calib_dataset", "{calib}", *SMALL, "--backend", "uniform", "--save", "{out}"],
    ["finetune", "--model", "{model}", "--calib_dataset", "{calib}", *SMALL, "--method", "none", "--save", "{out}"],
    ["prune", "--model", "{model}", "--calib_dataset", "{calib}", *SMALL, "--out", "{out}", "--save_model",
     "{root}/other"],  # two spellings of one setting, two values
    ["prune", "--model", "{model}", "--calib_dataset", "{calib}", *SMALL, "--seqlen", "16", "--calib_seqlen", "8",
     "--out", "{out}"],
    ["eval", "ppl", "--model", "{model}", "--seqlen", "64", "--eval_seqlen", "32", "--save", "{out}"],
])
def test_ambiguous_flags_are_refused(capsys, env, argv):
    err = _check(capsys, env["root"], ["--quiet", *(a.format(**env) for a in argv)])
    assert "same setting" in err or "unrecognized arguments" in err or "required" in err


def test_two_spellings_with_one_value_are_fine():
    from sparsellm.cli import build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--out", "x", "--save_model", "x", "--seqlen", "8",
                                      "--calib_seqlen", "8"])
    assert (args.out, args.seqlen) == ("x", 8)


def test_report_of_a_json_that_is_not_a_run(capsys, env):
    import json

    f = env["root"] / "bench.json"
    f.write_text(json.dumps({"command": "python bench/x.py", "eval": "wikitext2_ppl@2048, 16 windows"}))
    _check(capsys, env["root"], ["--quiet", "report", str(f)])


def test_every_input_is_protected_from_the_output(capsys, env, saved_model_dir):
    """The HellaSwag file and Self-Pruner's local chat model are inputs too: --out over them is refused."""
    import shutil

    hs = env["root"] / "hs"
    hs.mkdir()
    (hs / "hellaswag_val.jsonl").write_text('{"ctx_a": "a", "ctx_b": "b", "activity_label": "x", '
                                            '"endings": ["c", "d"], "label": 0}\n')
    err = _check(capsys, env["root"], ["--quiet", "prune", "--model", env["model"], "--calib_dataset", env["calib"],
                                       "--nsamples", "2", "--seqlen", "16", "--eval", "zeroshot", "--tasks",
                                       "hellaswag", "--hellaswag_file", str(hs / "hellaswag_val.jsonl"), "--limit",
                                       "1", "--out", str(hs), "--overwrite"])
    assert "overlaps the input" in err
    chat = env["root"] / "chat"
    shutil.copytree(saved_model_dir, chat)
    err = _check(capsys, env["root"], ["--quiet", "search", "--model", env["model"], "--calib_dataset", env["calib"],
                                       *SMALL, "--backend", "local", "--llm_model", str(chat), "--out", str(chat),
                                       "--overwrite"])
    assert "overlaps the input" in err
