"""bench/layerwise_bench.py --full_eval: what it records from a re-prune's report, with `sparsellm allocate`
replaced by a stub that writes a report of known per-window NLLs."""

from __future__ import annotations

import importlib.util
import json
import math
import types
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("layerwise_bench",
                                              Path(__file__).resolve().parents[1] / "bench/layerwise_bench.py")
lb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lb)

NLL = [1.0, 2.0, 3.0, 4.0]


@pytest.fixture
def allocate(monkeypatch):
    """Stub `sparsellm allocate`: records each command line and writes a report with NLL per window."""
    cmds = []

    def run(cmd, check, cwd):
        cmds.append(cmd)
        rates = json.loads(Path(cmd[cmd.index("--allocation") + 1].removeprefix("file:")).read_text())
        save = Path(cmd[cmd.index("--save") + 1])
        save.mkdir(parents=True)
        batch = int(cmd[cmd.index("--batch_size") + 1]) if "--batch_size" in cmd else 4
        ev = {"ppl": math.exp(sum(NLL) / len(NLL)), "windows": len(NLL), "tokens": 8188, "window_nll": NLL}
        (save / "report.json").write_text(json.dumps({
            "eval": {"wikitext2_ppl@2048": ev}, "allocation": {"rates": rates},
            "prune": {"measured": {"sparsity": 0.6}, "options": {"batch_size": batch}}}))

    monkeypatch.setattr(lb.subprocess, "run", run)
    return cmds


def _args(batch_size=None):
    return types.SimpleNamespace(model="m", method="sparsegpt", sparsity=0.6, nsamples=32, seqlen=512,
                                 batch_size=batch_size)


def test_full_eval_records_first_windows_and_batch(allocate, tmp_path):
    row = {"allocation": "atp", "rates": [0.5, 0.7], "windows": 2}
    out = lb.full_eval(_args(), row, tmp_path)
    assert out["ppl_all"] == pytest.approx(math.exp(2.5))
    assert out["ppl_all_first"] == pytest.approx(math.exp(1.5))  # windows 1 and 2 only
    assert out["window_nll_all"] == NLL and out["windows_all"] == 4
    assert out["batch_size_all"] == 4 and "--batch_size" not in allocate[0]  # the default micro-batch
    row.update(out, ppl=5.0, allocation_seconds=1.0, prune_seconds=2.0)
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"method": "sparsegpt", "sparsity": 0.6, "runs": [row]}))
    assert f"12.18 (4); re-prune, first 2: {math.exp(1.5):.2f}" in lb.table([str(f)])


def test_table_skips_files_that_are_not_results(tmp_path, capsys):
    f = tmp_path / "layerwise_x.json"
    f.write_text(json.dumps({"method": "wanda", "sparsity": 0.6, "runs": [
        {"allocation": "rmi", "ppl": 105.39, "windows": 16, "allocation_seconds": 1.0, "prune_seconds": 2.0}]}))
    check = tmp_path / "layerwise_x_batch16_check.report.json"  # a run report: no "runs"
    check.write_text(json.dumps({"eval": {}, "prune": {}}))
    lines = lb.table([str(f), str(check)]).splitlines()
    assert len(lines) == 3 and lines[2] == "| wanda | 60% | rmi | 105.39 | 16 |  |  | 1.0 | 2.0 |"
    assert "skipping" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(SystemExit, match="cannot read .*empty.json"):
        lb.table([str(f), str(tmp_path / "empty.json")])


def test_recorded_command_hides_temporary_paths(tmp_path):
    work = tmp_path / "it's a dir"
    cmd = ["/venv/sparsellm", "allocate", "--allocation", f"file:{work / 'r.json'}", "--save", str(work / "owl_all")]
    assert lb.recorded(cmd, {work / "owl_all": "DIR", work / "r.json": "RATES.json"}) == \
        "allocate --allocation file:RATES.json --save DIR"


@pytest.mark.parametrize("recorded,given,expected", [(16, None, "16"), (16, 8, "8"), (None, 8, "8")])
def test_full_eval_reprunes_with_the_rows_micro_batch(allocate, tmp_path, recorded, given, expected):
    row = {"allocation": "owl", "rates": [0.6, 0.6], "windows": 2, "batch_size": recorded}
    out = lb.full_eval(_args(given), row, tmp_path)
    assert allocate[0][allocate[0].index("--batch_size") + 1] == expected
    assert out["batch_size_all"] == int(expected)


def test_full_eval_refuses_other_rates_and_too_few_windows(allocate, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="fewer than its row's 16"):
        lb.full_eval(_args(), {"allocation": "owl", "rates": [0.6, 0.6], "windows": 16}, tmp_path)
    real = lb.subprocess.run  # the stub

    def other_rates(cmd, check, cwd):
        real(cmd, check, cwd)
        rep = Path(cmd[cmd.index("--save") + 1]) / "report.json"
        rep.write_text(rep.read_text().replace("[0.6, 0.6]", "[0.5, 0.7]"))

    monkeypatch.setattr(lb.subprocess, "run", other_rates)
    with pytest.raises(SystemExit, match="other rates"):
        lb.full_eval(_args(), {"allocation": "rmi", "rates": [0.6, 0.6], "windows": 2}, tmp_path)


def test_full_eval_rows_default_to_every_row_of_the_file(tmp_path):
    res = {"runs": [{"allocation": "uniform"}, {"allocation": "atp"}]}
    assert lb.full_eval_rows(res, None, tmp_path) == ["uniform", "atp"]
    assert lb.full_eval_rows(res, "atp,uniform,atp", tmp_path) == ["atp", "uniform"]
    with pytest.raises(SystemExit, match="no row for owl"):
        lb.full_eval_rows(res, "atp,owl", tmp_path)
