"""Defects a breaker found after issue 20's fixes: a run record replaced by `prune --save`, a diverged
fine-tuning saved as an all-NaN model with exit 0, a non-finite merge or a float16 overflow as a traceback,
and an infinite perplexity accepted without a warning by `eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import sentences
from sparsellm.cli import main
from test_cli import _assert_one_line_error, _tree

SMALL = ["--nsamples", "2", "--seqlen", "16"]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


def test_prune_save_never_replaces_another_runs_record(tmp_path, saved_model_dir, corpus, capsys):
    run = tmp_path / "run"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--out", str(run)]) == 0
    before = _tree(run)
    capsys.readouterr()
    argv = ["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
            "--prune_method", "magnitude", "--sparsity_ratio", "0.2", "--eval", "none", "--save", str(run)]
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr().err)
    assert _tree(run) == before  # the record still describes the weights next to it
    assert main(argv + ["--overwrite"]) == 0  # asked for explicitly
    assert json.loads((run / "report.json").read_text())["prune"]["method"] == "magnitude"


def test_eval_save_never_replaces_a_record_without_overwrite(tmp_path, saved_model_dir, capsys):
    d = tmp_path / "evals"
    argv = ["--quiet", "eval", "ppl", "--model", str(saved_model_dir), "--seqlen", "16", "--max_windows", "1",
            "--save", str(d)]
    assert main(argv) == 0
    first = (d / "report.json").read_bytes()
    capsys.readouterr()
    _assert_one_line_error(main(argv), capsys.readouterr().err)
    assert (d / "report.json").read_bytes() == first
    assert main(argv + ["--overwrite"]) == 0


def test_a_diverged_finetune_is_one_line_and_saves_nothing(tmp_path, saved_model_dir, corpus, capsys):
    out = tmp_path / "lo"
    code = main(["--quiet", "finetune", "--model", str(saved_model_dir), *SMALL, "--calib_dataset", str(corpus),
                 "--method", "lora", "--data", str(corpus), "--ft_nsamples", "8", "--ft_seqlen", "16",
                 "--ft_batch_size", "2", "--lr", "1e30", "--max_grad_norm", "1e30", "--eval", "none",
                 "--step_eval_windows", "0", "--out", str(out)])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "not finite" in err or "NaN" in err
    assert not out.exists() or not (out / "model.safetensors").exists()


def test_merge_of_non_finite_weights_is_a_usage_error():
    from sparsellm.adapt.masked_lora import add_masked_lora, lora_layers, merge
    from sparsellm.errors import NonFiniteError

    from conftest import make_model
    model = make_model("llama")
    for lin in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        with torch.no_grad():
            lin.weight[lin.weight.abs() < 0.01] = 0.0
    add_masked_lora(model, r=2)
    layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        merge(model)


def test_float16_overflow_is_a_usage_error(tmp_path):
    from sparsellm.errors import UsageError
    from sparsellm.models.save import save_model

    from conftest import make_model
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 1e6  # beyond float16's 65504
    with pytest.raises(UsageError, match="beyond the range of float16"):
        save_model(model, tmp_path / "m", "float16")


def test_eval_warns_on_an_infinite_perplexity_added_to_a_run(tmp_path, saved_model_dir, corpus, capsys,
                                                             monkeypatch):
    run = tmp_path / "run"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--out", str(run)]) == 0
    import sparsellm.runs.eval as run_eval

    monkeypatch.setattr(run_eval, "evaluate", lambda *a, **k: {"wikitext2_ppl@16": {"ppl": math.inf, "windows": 1, "tokens": 15, "seqlen": 16}})
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(run), "--save", str(run), "--seqlen", "16",
                 "--max_windows", "1"]) == 0
    err = capsys.readouterr().err
    assert "sparsellm: warning: wikitext2_ppl@16 is inf" in err
    assert any("wikitext2_ppl@16 is inf" in w for w in json.loads((run / "report.json").read_text())["warnings"])


def test_finetune_resume_refuses_a_finished_run_of_another_model_or_data(tmp_path, saved_model_dir, corpus,
                                                                         capsys):
    other = tmp_path / "other"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--out", str(other)]) == 0
    out = tmp_path / "ft"

    def ft(model, data, *extra):
        return main(["--quiet", "finetune", "--model", str(model), *SMALL, "--calib_dataset", str(corpus),
                     "--method", "losa", "--rmi_nsamples", "4", "--rank_nsamples", "4", "--steps", "2", "--lora_r",
                     "4", "--r_max", "8", "--rank_start", "2", "--rank_end", "4",
                     "--data", str(data), "--ft_nsamples", "4", "--ft_seqlen", "16",
                     "--ft_batch_size", "2", "--eval", "none", "--step_eval_windows", "0", "--out", str(out), *extra])

    assert ft(other, corpus) == 0
    before = _tree(out)
    capsys.readouterr()
    code = ft(saved_model_dir, corpus, "--resume")
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "input model" in err
    corpus2 = tmp_path / "corpus2.txt"
    corpus2.write_text("\n".join(sentences(300, seed=1)), encoding="utf-8")
    _assert_one_line_error(ft(other, corpus2, "--resume"), capsys.readouterr().err)
    corpus.write_text(corpus.read_text(encoding="utf-8") + "\nmore text", encoding="utf-8")  # same path, new bytes
    code = ft(other, corpus, "--resume")
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "fine-tuning data" in err
    assert _tree(out) == before
    (out / "report.json").write_text("{not json")
    _assert_one_line_error(ft(other, corpus, "--resume"), capsys.readouterr().err)


def test_an_unknown_flag_points_to_the_subcommands_help(capsys):
    assert main(["prune", "--model", "x", "--sparsty_ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "sparsellm: error: unrecognized arguments: --sparsty_ratio 0.5 (see sparsellm prune --help)"
    assert main(["eval", "ppl", "--model", "x", "--bogus"]) == 2
    assert "(see sparsellm eval ppl --help)" in capsys.readouterr().err


def test_a_2of4_input_without_sidecar_is_recognised_as_2of4(tmp_path, saved_model_dir, corpus, capsys):
    src = tmp_path / "w24"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--sparsity_type", "2:4", "--eval", "none", "--out", str(src)]) == 0
    (src / "sparsity_config.json").unlink()

    def ft(out, *extra):
        return main(["--quiet", "finetune", "--model", str(src), *SMALL, "--calib_dataset", str(corpus),
                     "--method", "masked-lora", "--data", str(corpus), "--ft_nsamples", "4", "--ft_seqlen", "16",
                     "--ft_batch_size", "2", "--eval", "none", "--step_eval_windows", "0", "--out", str(out), *extra])

    for out, extra in [(tmp_path / "a", ["--sparsity_type", "2:4"]), (tmp_path / "b", [])]:
        assert ft(out, *extra) == 0, capsys.readouterr().err
        assert json.loads((out / "sparsity_config.json").read_text())["sparsity_structure"] == "2:4"
        from safetensors.torch import load_file
        for k, w in load_file(out / "model.safetensors").items():
            if "layers." in k and w.dim() == 2 and "norm" not in k:  # every group of 4 inputs: at most 2 non-zeros
                assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, k


def test_report_of_an_eval_record_describes_the_evaluated_model(tmp_path, saved_model_dir, corpus, capsys):
    from sparsellm.compare import load_run, run_row

    w = tmp_path / "w"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--out", str(w)]) == 0
    for model, save in [(w, tmp_path / "e_sparse"), (saved_model_dir, tmp_path / "e_dense")]:
        assert main(["--quiet", "eval", "ppl", "--model", str(model), "--seqlen", "16", "--max_windows", "1",
                     "--save", str(save)]) == 0
    from safetensors.torch import load_file
    ws = [t for k, t in load_file(w / "model.safetensors").items() if "layers." in k and t.dim() == 2]
    zeros = sum(int((t == 0).sum()) for t in ws) / sum(t.numel() for t in ws)  # the saved weights, counted here
    row = run_row(*load_run(tmp_path / "e_sparse"))
    assert (row["method"], row["target"]) == ("wanda", 0.5) and row["measured"] == pytest.approx(zeros)
    row = run_row(*load_run(tmp_path / "e_dense"))
    assert (row["method"], row["target"], row["measured"]) == ("dense", 0.0, 0.0)


def test_resume_after_a_finished_losa_run_that_kept_its_checkpoint(tmp_path, saved_model_dir, corpus, capsys):
    out = tmp_path / "ft"
    argv = ["--quiet", "finetune", "--model", str(saved_model_dir), "--nsamples", "4", "--seqlen", "16",
            "--calib_dataset", str(corpus), "--method", "losa", "--rmi_nsamples", "4", "--rank_nsamples", "4", "--steps", "2", "--lora_r", "4",
            "--r_max", "8", "--rank_start", "2", "--rank_end", "4", "--keep_checkpoint", "--data", str(corpus),
            "--ft_nsamples", "4", "--ft_seqlen", "16", "--ft_batch_size", "2", "--eval", "none",
            "--step_eval_windows", "0", "--out", str(out)]
    assert main(argv) == 0
    assert (tmp_path / "ft.ckpt").is_dir()
    before = _tree(out)
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0, capsys.readouterr().err  # was: output directory not empty
    assert _tree(out) == before


def test_messages_name_the_real_problem(tmp_path, saved_model_dir, corpus, capsys):
    run = tmp_path / "run"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--out", str(run)]) == 0
    (run / "speed.json").write_text("{broken")
    capsys.readouterr()
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "speed.json is not valid JSON" in err
    code = main(["eval", "ppl", "--model", ""])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "--model is empty" in err
    rows = tmp_path / "long.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": "word " * 60, "output": "x"}) for _ in range(4)))
    code = main(["--quiet", "finetune", "--model", str(saved_model_dir), *SMALL, "--calib_dataset", str(corpus),
                 "--method", "masked-lora", "--data", str(rows), "--ft_nsamples", "2", "--ft_seqlen", "16",
                 "--eval", "none", "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "fills --ft_seqlen 16" in err


def test_a_float16_save_that_cannot_hold_a_weight_is_refused_before_any_work(tmp_path, saved_model_dir, corpus,
                                                                             capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    m = AutoModelForCausalLM.from_pretrained(saved_model_dir)
    with torch.no_grad():
        m.model.embed_tokens.weight[0, 0] = 1e6
    m.save_pretrained(big)
    for f in saved_model_dir.iterdir():
        if "token" in f.name:
            (big / f.name).write_bytes(f.read_bytes())
    import sparsellm.runs.prune as run_prune

    monkeypatch.setattr(run_prune, "prune", lambda *a, **k: pytest.fail("pruning started"))
    code = main(["--quiet", "prune", "--model", str(big), "--calib_dataset", str(corpus), *SMALL, "--eval", "none",
                 "--save_dtype", "float16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "model.embed_tokens.weight has values beyond the range of float16" in err
    assert not (tmp_path / "o").exists()


def test_finetune_warns_on_an_infinite_perplexity(tmp_path, saved_model_dir, corpus, capsys, monkeypatch):
    import sparsellm.runs.finetune as run_ft

    monkeypatch.setattr(run_ft, "evaluate", lambda *a, **k: {"wikitext2_ppl@16": {
        "ppl": math.inf, "windows": 1, "tokens": 15, "seqlen": 16}})
    out = tmp_path / "ft"
    assert main(["--quiet", "finetune", "--model", str(saved_model_dir), *SMALL, "--calib_dataset", str(corpus),
                 "--method", "masked-lora", "--data", str(corpus), "--ft_nsamples", "4", "--ft_seqlen", "16",
                 "--ft_batch_size", "2", "--eval", "wikitext2", "--eval_seqlen", "16", "--step_eval_windows", "0",
                 "--out", str(out)]) == 0
    assert "sparsellm: warning: wikitext2_ppl@16 is inf" in capsys.readouterr().err
    assert any("is inf" in w for w in json.loads((out / "report.json").read_text())["warnings"])


def test_a_setting_of_a_method_not_run_is_refused(saved_model_dir, capsys, monkeypatch):
    import sparsellm.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv in (["--method", "none", "--steps", "3"], ["--method", "lora,masked-lora", "--rmi_nsamples", "4"]):
        code = main(["--quiet", "finetune", "--model", str(saved_model_dir), "--out", "/nonexistent/x", *argv])
        err = capsys.readouterr().err
        _assert_one_line_error(code, err)
        assert "which --method" in err and argv[2] in err


def test_resume_refuses_other_eval_or_save_dtype_and_records_name_the_saved_dtype(tmp_path, saved_model_dir,
                                                                                  corpus, capsys):
    from safetensors import safe_open

    out = tmp_path / "ft"
    argv = ["--quiet", "finetune", "--model", str(saved_model_dir), "--nsamples", "4", "--seqlen", "16",
            "--calib_dataset", str(corpus), "--method", "losa", "--rmi_nsamples", "4", "--rank_nsamples", "4",
            "--steps", "2", "--lora_r", "4", "--r_max", "8", "--rank_start", "2", "--rank_end", "4", "--data",
            str(corpus), "--ft_nsamples", "4", "--ft_seqlen", "16", "--ft_batch_size", "2", "--eval", "none",
            "--step_eval_windows", "0", "--out", str(out)]
    assert main(argv) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = str(f.get_tensor(next(iter(f.keys()))).dtype).removeprefix("torch.")
    assert json.loads((out / "report.json").read_text())["saved_dtype"] == stored
    before = _tree(out)
    capsys.readouterr()
    for extra, what in ((["--save_dtype", "float16"], "--save_dtype"),
                        (["--eval", "wikitext2", "--max_windows", "1", "--eval_seqlen", "16"], "--eval")):
        code = main(argv + ["--resume", *extra])
        err = capsys.readouterr().err
        _assert_one_line_error(code, err)
        assert what in err and "finished with other settings" in err, err
    assert _tree(out) == before
    assert main(argv + ["--resume"]) == 0  # the same settings: skipped as finished
    p = tmp_path / "p"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus), *SMALL,
                 "--eval", "none", "--save_dtype", "bfloat16", "--out", str(p)]) == 0
    assert json.loads((p / "report.json").read_text())["saved_dtype"] == "bfloat16"


def test_every_warning_line_says_it_is_one(tmp_path, saved_model_dir, corpus):
    import subprocess
    import sys

    code = ("import logging, sys\nfrom sparsellm.cli import main\n"
            "from sparsellm.runs import prune as p\n"
            "from sparsellm.errors import UsageError\n"
            "def fake(cfg, progress=True):\n"
            "    logging.getLogger('sparsellm').warning('seqlen 9 exceeds')\n"
            "    raise UsageError('stop')\n"
            "p.run_prune = fake\n"
            f"sys.exit(main(['prune', '--model', {str(saved_model_dir)!r}, '--eval', 'none']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.strip().splitlines() == ["sparsellm: warning: seqlen 9 exceeds", "sparsellm: error: stop"], r.stderr


def test_the_context_warning_is_printed_once_and_plot_errors_names_bad_json(tmp_path, saved_model_dir, corpus,
                                                                            caplog, capsys):
    import logging

    with caplog.at_level(logging.WARNING, logger="sparsellm"):
        assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(corpus),
                     "--nsamples", "2", "--seqlen", "100000", "--eval", "none", "--out", str(tmp_path / "o")]) == 0
    assert sum("exceeds the model's context" in r.getMessage() for r in caplog.records) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    capsys.readouterr()
    code = main(["plot-errors", str(bad), "--out", str(tmp_path / "e.png")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "is not valid JSON" in err


def test_report_on_a_finetune_comparison_names_its_methods(tmp_path, capsys):
    root = tmp_path / "ft"
    (root / "none").mkdir(parents=True)
    (root / "none" / "report.json").write_text(json.dumps({"command": "finetune"}))
    (root / "comparison.json").write_text("{}")
    code = main(["report", str(root)])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "is a fine-tuning comparison" in err and str(root / "none") in err
