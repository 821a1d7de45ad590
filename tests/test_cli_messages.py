"""Errors say what is wrong, in one line with exit status 2, and nothing is written: the tools over runs
(`report`, `plot-errors`) with unusable paths, and the model and rate-file messages."""

from __future__ import annotations

import json

import pytest

from test_cli_bad_input import _check


@pytest.fixture
def runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"command": "eval ppl", "eval": {}}))
    (run / "errors.json").write_text(json.dumps({"command": "prune", "prune": {
        "method": "wanda", "blocks": [{"block": 0, "rel_error": 0.1, "cum_error": 0.1}]}}))
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "dirrun" / "report.json").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("argv,words", [
    (["report", "{root}/run", "--out", "{root}/afile/sub"], "afile"),
    (["report", "{root}/dirrun"], "report.json"),
    (["plot-errors", "{root}/run/errors.json", "--out", "{root}/afile/e.png"], "afile"),
])
def test_tools_over_runs_refuse_unusable_paths(capsys, runs, argv, words):
    """Before: an errno text ("[Errno 20] Not a directory", "[Errno 21] Is a directory") and exit 1."""
    err = _check(capsys, runs, ["--quiet", *(a.format(root=runs) for a in argv)])
    assert words in err and "Errno" not in err, err


@pytest.fixture
def env(tmp_path, saved_model_dir, calib_txt):
    return {"model": str(saved_model_dir), "calib": str(calib_txt), "out": str(tmp_path / "out"), "root": tmp_path}


def _prune(env, model, *extra):
    return ["--quiet", "prune", "--model", model, "--calib_dataset", env["calib"], "--nsamples", "2", "--seqlen", "16",
            "--eval", "none", "--out", env["out"], *extra]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_model_path_that_is_a_file_says_so(capsys, env, name):
    """Before: "model not found: ... is not a local path, a .gguf file, a hub id (org/name) or a preset"."""
    err = _check(capsys, env["root"], _prune(env, str(env["root"] / "model" / name)))
    assert "is a file" in err and str(env["root"] / "model") in err and ".gguf" in err, err


def test_a_directory_without_tokenizer_files_says_so(capsys, env):
    """Before: transformers' text about sentencepiece / tiktoken."""
    model = env["root"] / "model"
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    err = _check(capsys, env["root"], _prune(env, str(model)))
    assert "no tokenizer files" in err and "installed" not in err, err


@pytest.mark.parametrize("rates,named", [
    ({"0": 0.5, "1": 0.5, "layer.2": 0.5, "x": 0.5}, ["'layer.2'", "'x'"]),
    ({"0": 0.5, "1": 0.5, "7": 0.5}, ["7"]),
])
def test_unknown_keys_of_a_rate_file_are_named(capsys, env, rates, named):
    f = env["root"] / "rates.json"
    f.write_text(json.dumps(rates))
    err = _check(capsys, env["root"], _prune(env, env["model"], "--allocation", f"file:{f}"))
    assert all(n in err for n in named), err
