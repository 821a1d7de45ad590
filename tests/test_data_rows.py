"""Item 8 of issue 20: a data file's unusable rows are counted (run record, log line), and a file with more
than 10% of its rows dropped is refused with one line naming it and the first bad line."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from conftest import make_model, sentences
from sparsellm import PruneConfig, prune
from sparsellm.adapt.train import instruction_examples
from sparsellm.cli import main
from sparsellm import data
from sparsellm.data import calibration_windows, load_documents
from sparsellm.errors import UsageError
from test_cli import _assert_one_line_error, _tree


def _write(path, rows):
    """rows: dicts (written as JSON) or None (a blank line). Returns (non-blank rows, bad ones, first bad line)."""
    lines, good, bad, first = [], 0, 0, None
    for r in rows:
        lines.append("" if r is None else json.dumps(r))
        if r is None:
            continue
        ok = isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip() != ""
        good, bad = good + ok, bad + (not ok)
        if not ok and first is None:
            first = len(lines)
    path.write_text("\n".join(lines) + "\n")
    return good + bad, bad, first


def _rows(n_good, bad_at, docs):
    """n_good text rows with bad rows inserted at the positions `bad_at` (three kinds of bad row)."""
    rows = [{"text": d} for d in docs[:n_good]]
    kinds = [{"text": "  "}, {"url": "no text"}, {"text": 3}]
    for k, pos in enumerate(sorted(bad_at)):
        rows.insert(pos, kinds[k % 3])
    return rows


def test_24_of_44_rows_dropped_is_refused_naming_file_and_first_line(tmp_path):
    p = tmp_path / "half.jsonl"
    rows = _rows(20, range(7, 31), sentences(20, seed=1))
    total, bad, first = _write(p, rows[:3] + [None] + rows[3:])
    assert (total, bad, first) == (44, 24, 9)  # a blank line before: line numbers count it
    with pytest.raises(UsageError) as e:
        load_documents(str(p))
    msg = str(e.value)
    assert str(p) in msg and "24 of 44" in msg and "line 9" in msg and "10%" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="24 of 44"):
        data.corpus_rows(str(p))


def test_a_few_dropped_rows_are_counted_and_logged(tmp_path, tokenizer, caplog):
    p = tmp_path / "few.jsonl"
    docs = sentences(60, seed=2)
    total, bad, first = _write(p, _rows(60, [4, 30, 50], docs))
    assert (total, bad) == (63, 3) and bad / total <= 0.10
    assert load_documents(str(p)) == docs
    rows = data.corpus_rows(str(p))
    assert rows == {"file": str(p), "rows_used": 60, "rows_dropped": 3, "first_dropped_line": first,
                    "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    with caplog.at_level(logging.INFO, logger="sparsellm"):
        calibration_windows(tokenizer, str(p), 2, 16, seed=0)
    assert any("60 rows used, 3 dropped" in r.getMessage() and f"line {first}" in r.getMessage()
               for r in caplog.records)


def test_exactly_ten_percent_is_accepted_just_over_is_refused(tmp_path):
    docs = sentences(40, seed=4)
    ok, over = tmp_path / "ok.jsonl", tmp_path / "over.jsonl"
    _write(ok, _rows(36, [1, 2, 3, 4], docs))  # 4 of 40 = 10%
    assert data.corpus_rows(str(ok))["rows_dropped"] == 4
    _write(over, _rows(35, [1, 2, 3, 4, 5], docs))  # 5 of 40 > 10%
    with pytest.raises(UsageError, match="5 of 40"):
        load_documents(str(over))


def test_prune_report_records_the_rows(tmp_path, tokenizer):
    p = tmp_path / "calib.jsonl"
    total, bad, first = _write(p, _rows(80, [10, 20], sentences(80, seed=5)))
    model = make_model("llama")
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, nsamples=2, seqlen=16,
                                calib_dataset=str(p))
    rep = prune(model, tokenizer, cfg, progress=False)
    rows = rep["calibration"]["rows"]
    assert (rows["rows_used"], rows["rows_dropped"], rows["first_dropped_line"]) == (80, 2, first)


def test_cli_refuses_a_thinned_calibration_file_before_any_work(tmp_path, saved_model_dir, capsys):
    p = tmp_path / "half.jsonl"
    _write(p, _rows(20, range(3, 27), sentences(20, seed=6)))
    out = tmp_path / "out"
    before = _tree(tmp_path)
    code = main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(p), "--nsamples", "2",
                 "--seqlen", "16", "--eval", "none", "--out", str(out)])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert code == 2 and "24 of 44" in err and "line 4" in err
    assert _tree(tmp_path) == before


def _instr(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_instruction_rows_dropped_are_counted_or_refused(tmp_path, tokenizer):
    good = [{"instruction": f"say {w}", "output": f"{w} {w}"} for w in sentences(20, seed=7)]
    ok = tmp_path / "ok.jsonl"
    _instr(ok, good[:5] + [{"instruction": "no output"}] + good[5:])  # 1 of 21 dropped
    rows = {}
    ex = instruction_examples(tokenizer, ok, 64, rows)
    assert len(ex) == 20
    assert (rows["rows_used"], rows["rows_dropped"], rows["first_dropped_line"]) == (20, 1, 6)
    bad = tmp_path / "bad.jsonl"
    _instr(bad, good[:8] + [{"output": "x"}, {"instruction": "", "output": "y"}, {"instruction": "z"}])  # 3 of 11
    with pytest.raises(UsageError, match=r"3 of 11 rows dropped.*line 9"):
        instruction_examples(tokenizer, bad, 64)
