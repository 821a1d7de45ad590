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
