"""Item 16 of issue 20: `eval zeroshot --model RUN --save RUN` adds its results to that run's record (report.json
and report.md, atomically; the model files untouched), so `report` shows them; a result already there is
replaced only with --overwrite; another run's record is never replaced by an evaluation's."""

from __future__ import annotations

import json

import pytest

from conftest import require
from sparsellm.cli import main
from test_cli import _assert_one_line_error, _tree

pytestmark = pytest.mark.zeroshot


@pytest.fixture
def run_dir(tmp_path, saved_model_dir, calib_txt, capsys):
    d = tmp_path / "run"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--eval", "wikitext2", "--eval_seqlen", "32", "--max_windows",
                 "1", "--out", str(d)]) == 0
    capsys.readouterr()
    return d


def _model_files(d):
    return {k: v for k, v in _tree(d).items() if k not in ("report.json", "report.md")}


def test_zeroshot_is_added_to_the_run_and_report_shows_it(run_dir, capsys):
    require("lm_eval")
    before = json.loads((run_dir / "report.json").read_text())
    files = _model_files(run_dir)
    code = main(["eval", "zeroshot", "--model", str(run_dir), "--save", str(run_dir), "--tasks", "rte",
                 "--limit", "20", "--batch_size", "4"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    after = json.loads((run_dir / "report.json").read_text())
    assert _model_files(run_dir) == files, "the model files were touched"
    assert after["eval"]["wikitext2_ppl@32"] == before["eval"]["wikitext2_ppl@32"]
    assert {k: v for k, v in after.items() if k not in ("eval", "eval_added")} == \
        {k: v for k, v in before.items() if k != "eval"}
    zs = after["eval"]["zeroshot"]
    assert zs["tasks"]["rte"]["n"] == 20 and after["eval_added"][0]["command"] == "eval zeroshot"
    acc = zs["tasks"]["rte"]["acc"]
    se = (acc * (1 - acc) / 19) ** 0.5
    assert zs["tasks"]["rte"]["acc_stderr"] == pytest.approx(se)
    if se > 0.05:  # a random tiny model: about 0.5, so about 11 points
        assert "--limit 20" in cap.err and "rte" in cap.err
    assert f"{acc:.4f} ± {se:.4f}" in cap.out and f"added to {run_dir / 'report.json'}" in cap.out
    assert f"{acc:.4f} ± {se:.4f}" in (run_dir / "report.md").read_text()
    assert main(["report", str(run_dir)]) == 0
    assert f"{acc:.4f} ± {se:.4f}" in capsys.readouterr().out  # one task: the mean is the task's


def test_an_existing_result_needs_overwrite(run_dir, capsys):
    argv = ["--quiet", "eval", "ppl", "--model", str(run_dir), "--save", str(run_dir), "--max_windows", "1",
            "--seqlen", "32"]
    before = _tree(run_dir)
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr().err)
    assert code == 2 and _tree(run_dir) == before
    assert main(argv + ["--dataset", "c4"]) == 0  # a new metric is added
    rep = json.loads((run_dir / "report.json").read_text())
    assert set(rep["eval"]) == {"wikitext2_ppl@32", "c4_ppl@32"}
    assert main(argv + ["--overwrite"]) == 0
    assert len(json.loads((run_dir / "report.json").read_text())["eval_added"]) == 2


def test_other_directories_are_refused(run_dir, saved_model_dir, capsys):
    for model, save, match in [(saved_model_dir, run_dir, "holds the record of another run"),
                               (saved_model_dir, saved_model_dir, "holds no run record")]:
        before = _tree(run_dir.parent)
        code = main(["--quiet", "eval", "ppl", "--model", str(model), "--save", str(save), "--max_windows", "1"])
        err = capsys.readouterr().err
        _assert_one_line_error(code, err)
        assert code == 2 and match in err and _tree(run_dir.parent) == before
