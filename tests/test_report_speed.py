"""`sparsellm bench` (measured speed, KV-cache decode loop) and `sparsellm report` (runs side by side)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.evaluate.speed import compare, decode_seconds


def test_decode_loop_uses_the_kv_cache_one_token_per_step():
    model = make_model("llama")
    calls = []
    real = model.forward

    def spy(input_ids=None, cache=None, **kw):
        calls.append((tuple(input_ids.shape), cache is not None))
        return real(input_ids=input_ids, cache=cache, **kw)

    model.forward = spy
    ids = torch.randint(3, 100, (2, 10))
    decode_seconds(model, ids, 5)
    assert calls[0] == ((2, 10), False)  # the prefill
    assert calls[1:] == [((2, 1), True)] * 5
    # and the greedy tokens it feeds are those of plain generate()
    model.forward = real
    fed = []
    model.forward = lambda input_ids=None, cache=None, **kw: (fed.append(input_ids.clone()),
                                                               real(input_ids=input_ids, cache=cache, **kw))[1]
    decode_seconds(model, ids, 4)
    model.forward = real
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(torch.cat(fed[1:], 1), ref[:, 10:14])


def test_compare_reports_throughput_and_ratios(monkeypatch):
    import sparsellm.evaluate.speed as speed

    a, b = make_model("llama"), make_model("llama", seed=1)
    fake = {id(a): 2.0, id(b): 1.0}  # seconds per call: b is twice as fast
    monkeypatch.setattr(speed, "prefill_seconds", lambda m, ids: fake[id(m)])
    monkeypatch.setattr(speed, "decode_seconds", lambda m, ids, n: fake[id(m)])
    res = compare({"dense": a, "sparse": b}, prefill_lengths=(16, 64, 1000), decode_batches=(1, 4),
                  decode_prompt=8, new_tokens=3, repeats=3, warmup=1, progress=False)
    assert list(res["results"]["dense"]) == ["prefill@16", "prefill@64", "decode_b1", "decode_b4"]  # 1000 > context
    assert res["results"]["dense"]["prefill@64"] == pytest.approx(64 / 2.0)
    assert res["results"]["sparse"]["decode_b4"] == pytest.approx(4 * 3 / 1.0)
    assert all(v == pytest.approx(2.0) for v in res["ratios"]["sparse"].values())
    assert res["device"] == "cpu"
    with pytest.raises(UsageError):
        compare({"dense": a}, repeats=0)


def test_cli_bench_and_report(capsys, tmp_path, saved_model_dir, calib_txt):
    runs = []
    for i, (method, ratio, alloc) in enumerate([("wanda", "0.3", "uniform"), ("sparsegpt", "0.6", "atp")]):
        d = tmp_path / f"run{i}"
        extra = ["--atp_beta", "0.2"] if alloc == "atp" else []
        assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                     "--nsamples", "2", "--seqlen", "16", "--prune_method", method, "--sparsity_ratio", ratio,
                     "--allocation", alloc, *extra, *(["--blocksize", "16"] if method == "sparsegpt" else []), "--eval", "wikitext2", "--eval_seqlen",
                     "32", "--max_windows", "2", "--save_model", str(d)]) == 0
        runs.append(d)
    capsys.readouterr()
    # speed: the baseline defaults to the model named in the run's report.json
    assert main(["--quiet", "bench", "--model", str(runs[0]), "--prefill", "8,16", "--decode_batches", "1,2",
                 "--new_tokens", "2", "--decode_prompt", "8", "--repeats", "1", "--warmup", "0", "--threads", "1", "--save", str(runs[0])]) == 0
    sp = json.loads((runs[0] / "speed.json").read_text())
    assert sp["baseline"] == str(saved_model_dir) and sp["threads"] == 1
    assert set(sp["results"]) == {"dense fp32", "model fp32", "dense bf16", "model bf16"}
    assert set(sp["ratios"]["model fp32"]) == {"prefill@8", "prefill@16", "decode_b1", "decode_b2"}
    res = sp["results"]
    for n in ("model fp32", "model bf16", "dense fp32"):  # the second baseline of issue 5, from the same run
        assert sp["ratios_vs_dense_bf16"][n] == pytest.approx({k: res[n][k] / res["dense bf16"][k] for k in res[n]})
    out = capsys.readouterr().out
    assert "tok/s" in out and "model bf16 vs dense bf16: prefill@8" in out
    sp["ratios"]["deepsparse model"] = {"prefill@8": 1.234}  # as `bench --deepsparse` adds it
    sp["ratios"]["model 2:4 cusparselt"] = {"prefill@512": 1.567}  # as `bench --device cuda --kernels semi24` does
    sp["ratio_spread"]["model 2:4 cusparselt"] = {"prefill@512": {"repeats": 3, "min": 0.91, "q1": 1.2, "median": 1.5,
                                                                  "q3": 1.6, "max": 1.7, "within_noise": True}}
    (runs[0] / "speed.json").write_text(json.dumps(sp))

    out = tmp_path / "summary"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for i, d in enumerate(runs):
        w = load_file(d / "model.safetensors")
        nz = sum(int((t != 0).sum()) for k, t in w.items() if ".layers." in k and k.endswith("proj.weight"))
        assert f"{nz:,}" in table, (i, nz)
        assert f"{(d / 'model.safetensors').stat().st_size / 2**20:.1f}" in table
    assert "speed decode_b1" in table and "wikitext2_ppl@32" in table
    assert "speed deepsparse prefill@8" in table and "1.23×" in table
    assert "speed 2:4 prefill@512" in table and "1.57× (0.91–1.70, within noise)" in table
    assert (out / "report.md").read_text().count("\n| ") >= 3
    for png in ("ppl_vs_sparsity.png", "rates.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,match", [
    (["bench", "--model", "MODEL", "--prefill", "8,x"], "--prefill"),
    (["bench", "--model", "MODEL", "--decode_batches", "0"], "--decode_batches"),
    (["bench", "--model", "MODEL"], "--baseline"),
    (["bench", "--model", "MODEL", "--baseline", "MODEL", "--repeats", "0"], "--repeats"),
    (["report", "ROOT/nope"], "no report.json"),
    (["report", "MODEL/config.json"], "not a sparsellm run report"),
])
def test_bad_input(capsys, tmp_path, saved_model_dir, argv, match):
    argv = [a.replace("MODEL", str(saved_model_dir)).replace("ROOT", str(tmp_path)) for a in argv]
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsellm: error:") and match in err and len(err.strip().splitlines()) == 1, err


def test_report_and_plot_errors_guards(capsys, tmp_path, saved_model_dir, calib_txt):
    run = tmp_path / "run"
    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--allocation", "atp", "--atp_beta", "0.2",
                 "--sparsity_ratio", "0.4", "--save", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["report", str(run / "report.json"), "--out", str(run)]) == 2  # the run's own directory
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert "run directory" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0  # an allocate-only run: method, allocation and target from its config
    row = [ln for ln in capsys.readouterr().out.splitlines() if str(run) in ln][0]
    assert "| wanda | atp |" in row and "| 0.40 |" in row
    spread = {"repeats": 3, "min": 0.9, "max": 1.2, "within_noise": True}
    for speed_json, says in [  # hand-edited or foreign speed.json files: one line each, no traceback
            ({"ratios": {"model fp32": {"prefill@8": "fast"}}}, "'prefill@8' is not a finite number"),
            ({"ratios": {"model fp32": {"prefill@8": float("nan")}}}, "'prefill@8' is not a finite number"),
            ({"ratios": {"model 2:4 x": {"prefill@8": True}}}, "'2:4 prefill@8' is not a finite number"),
            ({"ratios": {"model fp32": {"prefill@8": 1.1}}, "ratio_spread": {"model fp32": {"prefill@8": {"repeats": 3}}}},
             "the spread of 'prefill@8'"),
            ({"ratios": {"model fp32": {"prefill@8": 1.1}},
              "ratio_spread": {"model fp32": {"prefill@8": {**spread, "repeats": "3"}}}}, "the spread of 'prefill@8'"),
            ([1, 2], "speed.json is not a sparsellm bench result"),
            ({"ratios": None}, "speed.json is not a sparsellm bench result")]:
        (run / "speed.json").write_text(json.dumps(speed_json))
        assert main(["report", str(run)]) == 2, speed_json
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    (run / "speed.json").write_text(json.dumps({"ratios": {"model fp32": {"prefill@8": 1.1}},
                                                "ratio_spread": {"model fp32": {"prefill@8": spread}}}))
    assert main(["report", str(run)]) == 0 and "1.10× (0.90–1.20, within noise)" in capsys.readouterr().out
    (run / "speed.json").unlink()
    assert main(["plot-errors", str(run), "--out", str(tmp_path / "e.png")]) == 2  # it pruned nothing
    assert "pruned nothing" in capsys.readouterr().err and not (tmp_path / "e.png").exists()
    bad = tmp_path / "bad.json"
    for content in ('{"command": "prune", "prune": {"blocks": [1, 2]}}', '{"prune": {"blocks": "x"}}'):
        bad.write_text(content)
        assert main(["plot-errors", str(bad), "--out", str(tmp_path / "e.png")]) == 2
        assert "not a sparsellm prune report" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [(["--threads", "100000"], "--threads"),
                                         (["--prefill", "100000", "--decode_prompt", "100000"], "context")])
def test_bench_bad_settings(capsys, saved_model_dir, extra, match):
    assert main(["--quiet", "bench", "--model", str(saved_model_dir), "--baseline", str(saved_model_dir),
                 "--no_bf16", "--repeats", "1", "--warmup", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("sparsellm: error:"), err
