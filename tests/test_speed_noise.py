"""Item 11 of issue 20: every speed ratio comes with the spread of its per-repeat ratios (baseline and model
timed in turn, in one process), and a ratio whose spread contains 1.0× is printed as within noise, never as
a speed-up."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_model
from sparsellm.evaluate import speed
from sparsellm.compare import compare_runs
from sparsellm.report import speed_table

BASE = [1.0, 2.0, 1.0, 4.0]  # seconds of the baseline's timed repeats, in order
MODEL = [2.0, 1.0, 1.0, 1.0]  # the model's: per-repeat ratios 0.5, 2, 1, 4; ratio of medians 1.5


def _fake(monkeypatch, a, b, base, model, warmup=1):
    seq = {id(a): [], id(b): []}

    def t(m, *args):
        if not seq[id(m)]:  # a new measurement: warm-up runs first, then the timed repeats
            seq[id(m)].extend([9.0] * warmup + (base if m is a else model))
        return seq[id(m)].pop(0)

    monkeypatch.setattr(speed, "prefill_seconds", t)
    monkeypatch.setattr(speed, "decode_seconds", t)


def test_per_repeat_times_and_the_spread_of_the_ratio(monkeypatch):
    a, b = make_model("llama"), make_model("llama", seed=1)
    _fake(monkeypatch, a, b, BASE, MODEL)
    res = speed.compare({"dense": a, "model": b}, prefill_lengths=(16,), decode_batches=(1,), decode_prompt=8,
                        new_tokens=2, repeats=4, warmup=1, progress=False)
    assert res["seconds"]["dense"]["prefill@16"] == BASE and res["seconds"]["model"]["decode_b1"] == MODEL
    assert res["ratios"]["model"]["prefill@16"] == pytest.approx(np.median(BASE) / np.median(MODEL))
    per = np.array(BASE) / np.array(MODEL)
    s = res["ratio_spread"]["model"]["prefill@16"]
    assert (s["min"], s["max"], s["repeats"]) == (pytest.approx(per.min()), pytest.approx(per.max()), 4)
    assert [s["q1"], s["median"], s["q3"]] == pytest.approx(list(np.percentile(per, [25, 50, 75])))
    assert s["within_noise"] is True
    text = speed_table({"results": {"dense fp32": res["results"]["dense"], "model fp32": res["results"]["model"]},
                        "ratios": {"model fp32": res["ratios"]["model"]},
                        "ratio_spread": {"model fp32": res["ratio_spread"]["model"]}})
    assert "1.50× (0.50–4.00, within noise)" in text and "speed-up" not in text


def test_a_clear_difference_is_not_flagged_and_one_repeat_says_so(monkeypatch):
    a, b = make_model("llama"), make_model("llama", seed=1)
    _fake(monkeypatch, a, b, [2.0, 2.2, 2.1], [1.0, 1.05, 1.1])
    res = speed.compare({"dense": a, "model": b}, prefill_lengths=(16,), decode_batches=(), repeats=3, warmup=1,
                        progress=False)
    s = res["ratio_spread"]["model"]["prefill@16"]
    assert s["within_noise"] is False and s["min"] == pytest.approx(2.1 / 1.1) and s["max"] == pytest.approx(2.2 / 1.05)
    assert speed.ratio_spread([1.0], [0.5])["within_noise"] is None
    text = speed_table({"results": {"dense fp32": {"prefill@16": 1.0}, "model fp32": {"prefill@16": 2.0}},
                        "ratios": {"model fp32": {"prefill@16": 2.0}},
                        "ratio_spread": {"model fp32": {"prefill@16": speed.ratio_spread([1.0], [0.5])}}})
    assert "2.00× (1 repeat: noise not measured)" in text


def test_report_prints_the_spread_from_speed_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"command": "eval ppl", "model": "m", "eval": {}}))
    spread = speed.ratio_spread(BASE, MODEL)
    (run / "speed.json").write_text(json.dumps({"ratios": {"model fp32": {"decode_b1": 2.1}},
                                                "ratio_spread": {"model fp32": {"decode_b1": spread}}}))
    table = compare_runs([run])
    assert "2.10× (0.50–4.00, within noise)" in table


def test_bench_records_every_repeat_and_the_spreads(tmp_path, saved_model_dir, capsys):
    from sparsellm.cli import main

    out = tmp_path / "speed"
    assert main(["--quiet", "bench", "--model", str(saved_model_dir), "--baseline", str(saved_model_dir),
                 "--prefill", "8", "--decode_batches", "1", "--new_tokens", "2", "--decode_prompt", "8",
                 "--repeats", "3", "--warmup", "0", "--threads", "1", "--save", str(out)]) == 0
    sp = json.loads((out / "speed.json").read_text())
    sec = sp["seconds"]
    assert all(len(sec[n][k]) == 3 for n in sec for k in sec[n])
    for n, ref in (("model fp32", "dense fp32"), ("model bf16", "dense bf16")):
        per = np.array(sec[ref]["decode_b1"]) / np.array(sec[n]["decode_b1"])
        got = (sp["ratio_spread"] if ref == "dense fp32" else sp["ratio_spread_vs_dense_bf16"])[n]["decode_b1"]
        assert (got["min"], got["max"]) == (pytest.approx(per.min()), pytest.approx(per.max()))
        assert got["within_noise"] == bool(per.min() <= 1.0 <= per.max())
    assert "speed-up" not in capsys.readouterr().out


def test_settings_past_the_context_are_named_not_dropped_silently(monkeypatch, capsys):
    a, b = make_model("llama"), make_model("llama", seed=1)  # context 128
    _fake(monkeypatch, a, b, [1.0], [1.0], warmup=0)
    res = speed.compare({"dense": a, "model": b}, prefill_lengths=(16, 256), decode_batches=(1, 2), decode_prompt=100,
                        new_tokens=40, repeats=1, warmup=0, progress=True)
    assert list(res["results"]["model"]) == ["prefill@16"]
    assert res["settings"]["skipped_past_context"] == ["prefill@256", "decode_b1", "decode_b2"]
    assert "skipped (past the model's context of 128 tokens): prefill@256, decode_b1, decode_b2" in capsys.readouterr().err
