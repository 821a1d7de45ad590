"""The command line: every bad input is one line on stderr, a non-zero exit status and nothing written;
one happy path writes a complete directory."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_model
from sparsellm.cli import main

FAST = ["--eval", "none", "--nsamples", "2", "--seqlen", "16"]


def _tree(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _run(capsys, argv):
    capsys.readouterr()  # drop what the fixtures printed (save_pretrained progress bars)
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


_TQDM = re.compile(r"^[^|]*:\s+\d+%\|.*\|\s*\d+/\d+ \[")  # "Loading weights: 100%|####| 20/20 [..]"


def _assert_one_line_error(code, err, allow_progress_bars=True):
    """exit status != 0, no traceback, exactly one non-empty line, which starts 'sparsellm: error:'.
    Progress-bar lines printed by transformers while loading are tolerated here (see
    test_quiet_bad_input_prints_only_the_error for the strict check)."""
    assert code != 0
    assert "Traceback" not in err
    lines = [seg for ln in err.splitlines() for seg in ln.split("\r") if seg.strip()]
    if allow_progress_bars:
        lines = [ln for ln in lines if not _TQDM.match(ln)]
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsellm: error:"), err
    assert len(lines[0]) > len("sparsellm: error: ")


@pytest.fixture
def cli_env(tmp_path, saved_model_dir, calib_txt):
    return {"model": str(saved_model_dir), "calib": str(calib_txt), "out": str(tmp_path / "out"), "root": tmp_path}


def _bad(capsys, env, extra, model=None, save_model=True):
    argv = ["--quiet", "prune", "--model", model or env["model"], "--calib_dataset", env["calib"], *FAST]
    if save_model:
        argv += ["--save_model", env["out"]]
    before = _tree(env["root"])
    code, out, err = _run(capsys, argv + extra)
    _assert_one_line_error(code, err)
    assert _tree(env["root"]) == before, "something was written"
    return err


def test_missing_model_path(capsys, cli_env):
    err = _bad(capsys, cli_env, [], model=str(cli_env["root"] / "no" / "such" / "model"))
    assert "not found" in err


def test_missing_relative_model_path(capsys, cli_env, monkeypatch):
    """A relative path that does not exist ('models/llama') is still a missing model path: one line, no hub
    error text spread over several lines."""
    monkeypatch.chdir(cli_env["root"])
    _bad(capsys, cli_env, [], model="models/llama-does-not-exist")


def test_directory_without_config(capsys, cli_env):
    d = cli_env["root"] / "empty_model_dir"
    d.mkdir()
    _bad(capsys, cli_env, [], model=str(d))


def test_unknown_preset(capsys, cli_env):
    err = _bad(capsys, cli_env, [], model="no-such-model")
    assert "no-such-model" in err


def test_unsupported_architecture(capsys, cli_env, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    d = cli_env["root"] / "gpt2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)) \
        .save_pretrained(d)
    tokenizer.save_pretrained(d)
    err = _bad(capsys, cli_env, [], model=str(d))
    assert "gpt2" in err


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_bad_sparsity(capsys, cli_env, ratio):
    _bad(capsys, cli_env, [f"--sparsity_ratio={ratio}"])


@pytest.mark.parametrize("pattern", ["2-4", "abc", "4:4", "5:4", "0:4"])
def test_bad_pattern(capsys, cli_env, pattern):
    _bad(capsys, cli_env, ["--sparsity_type", pattern])


def test_bad_prunen_prunem(capsys, cli_env):
    _bad(capsys, cli_env, ["--prunen", "4", "--prunem", "4"])
    _bad(capsys, cli_env, ["--prunen", "2"])


def test_pattern_contradicts_ratio(capsys, cli_env):
    _bad(capsys, cli_env, ["--sparsity_type", "2:4", "--sparsity_ratio", "0.3"])


def test_in_features_not_divisible(capsys, cli_env, tokenizer):
    d = cli_env["root"] / "llama36"
    make_model("llama", hidden_size=36, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1) \
        .save_pretrained(d)
    tokenizer.save_pretrained(d)
    err = _bad(capsys, cli_env, ["--sparsity_type", "2:8"], model=str(d))
    assert "divisible" in err


@pytest.mark.parametrize("content", ["the film .", ""])
def test_calibration_corpus_too_short_or_empty(capsys, cli_env, content):
    short = cli_env["root"] / "short.txt"
    short.write_text(content)
    cli_env = dict(cli_env, calib=str(short))
    _bad(capsys, cli_env, [])


def test_quiet_bad_input_prints_only_the_error(capsys, cli_env):
    """--quiet means 'no progress bars': a bad input found after loading the model (a too-short corpus)
    must still produce exactly one line on stderr."""
    short = cli_env["root"] / "short.txt"
    short.write_text("the film .")
    code, _, err = _run(capsys, ["--quiet", "prune", "--model", cli_env["model"], "--calib_dataset", str(short),
                                 *FAST, "--save_model", cli_env["out"]])
    _assert_one_line_error(code, err, allow_progress_bars=False)


def test_calibration_file_missing_or_bad(capsys, cli_env):
    _bad(capsys, dict(cli_env, calib=str(cli_env["root"] / "missing.jsonl")), [])
    bad = cli_env["root"] / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    _bad(capsys, dict(cli_env, calib=str(bad)), [])
    csv = cli_env["root"] / "data.csv"
    csv.write_text("text\nhello\n")
    _bad(capsys, dict(cli_env, calib=str(csv)), [])


def test_unknown_eval_dataset(capsys, cli_env):
    argv = ["--quiet", "prune", "--model", cli_env["model"], "--calib_dataset", cli_env["calib"],
            "--nsamples", "2", "--seqlen", "16", "--eval", "lambada", "--save_model", cli_env["out"]]
    before = _tree(cli_env["root"])
    code, _, err = _run(capsys, argv)
    _assert_one_line_error(code, err)
    assert _tree(cli_env["root"]) == before


def test_existing_nonempty_output_without_overwrite(capsys, cli_env):
    out = cli_env["root"] / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    err = _bad(capsys, cli_env, [])
    assert "overwrite" in err
    assert (out / "precious.txt").read_text() == "do not touch"


@pytest.mark.parametrize("where", [".", "sub", "sub/deeper"])
def test_output_is_or_inside_input_model(capsys, cli_env, where):
    target = cli_env["model"] if where == "." else str(cli_env["root"] / "model" / where)
    err = _bad(capsys, dict(cli_env, out=target), ["--overwrite"])
    assert "overlaps" in err or "input" in err


def test_output_contains_input_model(capsys, cli_env):
    _bad(capsys, dict(cli_env, out=str(cli_env["root"])), ["--overwrite"])


def test_output_is_a_file(capsys, cli_env):
    f = cli_env["root"] / "afile"
    f.write_text("x")
    _bad(capsys, dict(cli_env, out=str(f)), ["--overwrite"])


# ------------------------------------------------------------------ happy path


def test_happy_path_writes_complete_directory(capsys, cli_env):
    from transformers import AutoModelForCausalLM

    out = cli_env["root"] / "results" / "pruned"
    code, stdout, err = _run(capsys, [
        "--quiet", "prune", "--model", cli_env["model"], "--prune_method", "sparsegpt", "--sparsity_type", "2:4",
        "--calib_dataset", cli_env["calib"], *FAST, "--blocksize", "16", "--save_model", str(out),
        "--save", str(cli_env["root"] / "reports")])
    assert code == 0, err
    assert "Traceback" not in err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "sparsity_config.json",
            "report.json", "report.md"} <= names
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert [p.name for p in out.parent.iterdir()] == ["pruned"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prune_method"] == "sparsegpt"
    assert report["prune"]["calibration"]["nsamples"] == 2 and report["prune"]["calibration"]["seqlen"] == 16
    assert "eval" not in report
    sc = json.loads((out / "sparsity_config.json").read_text())
    assert sc["method"] == "sparsegpt" and sc["sparsity_structure"] == "2:4"
    assert (out / "report.md").read_text().startswith("# sparsellm run")
    assert json.loads((cli_env["root"] / "reports" / "report.json").read_text()) == report

    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert ((lin.weight == 0).reshape(lin.out_features, -1, 4).sum(-1) >= 2).all()
    assert "sparsegpt" in stdout

    # the same output again without --overwrite is refused; with it, replaced
    code, _, err = _run(capsys, ["--quiet", "prune", "--model", cli_env["model"], "--calib_dataset", cli_env["calib"],
                                 *FAST, "--save_model", str(out)])
    _assert_one_line_error(code, err)
    code, _, err = _run(capsys, ["--quiet", "prune", "--model", cli_env["model"], "--calib_dataset", cli_env["calib"],
                                 *FAST, "--save_model", str(out), "--overwrite", "--prune_method", "magnitude"])
    assert code == 0, err
    assert json.loads((out / "sparsity_config.json").read_text())["method"] == "magnitude"
    assert [p.name for p in out.parent.iterdir()] == ["pruned"]


def test_prunen_prunem_alias(capsys, cli_env):
    out = cli_env["root"] / "o"
    code, _, err = _run(capsys, ["--quiet", "prune", "--model", cli_env["model"], "--calib_dataset",
                                 cli_env["calib"], *FAST, "--prune_method", "magnitude", "--prunen", "1",
                                 "--prunem", "4", "--save_model", str(out)])
    assert code == 0, err
    assert json.loads((out / "sparsity_config.json").read_text())["sparsity_structure"] == "1:4"


# ------------------------------------------------------------------ found by adversarial testing


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"no gzip here", b"\x1f\x8b\x08\x00truncated"])
def test_unreadable_calibration_file(capsys, cli_env, content):
    bad = cli_env["root"] / "calib.jsonl.gz"
    bad.write_bytes(content)
    err = _bad(capsys, {**cli_env, "calib": str(bad)}, [])
    assert "calib.jsonl.gz" in err


def test_binary_jsonl_calibration_file(capsys, cli_env):
    bad = cli_env["root"] / "calib.jsonl"
    bad.write_bytes(bytes(range(256)) * 4)
    _bad(capsys, {**cli_env, "calib": str(bad)}, [])


@pytest.mark.parametrize("where", ["model", "inside"])
def test_reports_dir_may_not_overlap_the_input(capsys, cli_env, where):
    target = cli_env["model"] if where == "model" else str(cli_env["root"] / "model" / "reports")
    if where == "inside":
        target = cli_env["model"] + "/reports"
    _bad(capsys, cli_env, ["--save", target], save_model=False)


def test_output_dir_over_the_calibration_file(capsys, cli_env):
    """--overwrite must never delete an input, the calibration file included."""
    calib_dir = cli_env["root"] / "data"
    calib_dir.mkdir()
    (calib_dir / "c.txt").write_text(open(cli_env["calib"]).read())
    env = {**cli_env, "calib": str(calib_dir / "c.txt"), "out": str(calib_dir)}
    _bad(capsys, env, ["--overwrite"])


def test_output_dir_under_a_file(capsys, cli_env):
    f = cli_env["root"] / "afile"
    f.write_text("x")
    _bad(capsys, {**cli_env, "out": str(f / "sub")}, [])


def test_empty_output_path(capsys, cli_env):
    _bad(capsys, {**cli_env, "out": ""}, [])


def test_argparse_errors_are_one_line(capsys, cli_env):
    code, out, err = _run(capsys, ["prune", "--sparsity_ratio", "abc"])
    _assert_one_line_error(code, err, allow_progress_bars=False)


def test_eval_with_no_dataset_is_an_error(capsys, cli_env):
    code, out, err = _run(capsys, ["--quiet", "eval", "ppl", "--model", cli_env["model"], "--dataset", "none"])
    _assert_one_line_error(code, err)


def test_model_with_unknown_model_type(capsys, cli_env):
    d = cli_env["root"] / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "foobar"}))
    _bad(capsys, cli_env, [], model=str(d))


def test_model_with_corrupt_weights(capsys, cli_env):
    import shutil

    d = cli_env["root"] / "corrupt"
    shutil.copytree(cli_env["model"], d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    _bad(capsys, cli_env, [], model=str(d))


def test_junk_gguf(capsys, cli_env, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path / "cache"))
    g = cli_env["root"] / "junk.gguf"
    g.write_bytes(b"not a gguf file at all")
    _bad(capsys, cli_env, [], model=str(g))


def test_reports_dir_may_contain_the_model(capsys, tmp_path, saved_model_dir):
    """`eval ppl --model parent/model --save parent` writes only parent/report.json: allowed, model untouched."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(saved_model_dir, parent / "model")
    before = _tree(parent / "model")
    code, out, err = _run(capsys, ["--quiet", "eval", "ppl", "--model", str(parent / "model"), "--seqlen", "16",
                                   "--max_windows", "1", "--save", str(parent)])
    assert code == 0, err
    assert (parent / "report.json").is_file()
    assert _tree(parent / "model") == before


@pytest.mark.parametrize("extra", [
    ["--allocation", "atp", "--atp_beta", "5"],
    ["--allocation", "uniform", "--atp_beta", "0.01"],
    ["--allocation", "file:/no/such/rates.json"],
    ["--allocation", "nonsense"],
])
def test_bad_allocation(capsys, cli_env, extra):
    _bad(capsys, cli_env, extra)


@pytest.mark.parametrize("argv,quiet", [(["prune", "-m"], False), (["--quiet", "prune", "-m"], True),
                                        (["prune", "--quiet", "-m"], True), (["--quiet", "eval", "ppl", "-m"], True),
                                        (["eval", "ppl", "--quiet", "-m"], True), (["eval", "zeroshot", "-m"], False),
                                        (["plot-errors", "r.json", "--out", "x.png", "--quiet"], True),
                                        (["eval", "--quiet", "zeroshot", "-m"], True),
                                        (["--quiet", "finetune", "--out", "o", "--quiet", "-m"], True)])
def test_quiet_before_or_after_the_subcommand(argv, quiet):
    from sparsellm.cli import build_parser

    argv = [a for x in argv for a in (["--model", "m"] if x == "-m" else [x])]
    assert build_parser().parse_args(argv).quiet is quiet


@pytest.mark.parametrize("argv", [["prune"], ["--quiet", "prune"], ["prune", "--quiet"], ["--quiet", "prune", "--quiet"]])
def test_bare_prune_prints_its_usage(argv, monkeypatch, capsys):
    """Before: a bare `sparsellm prune` started a 10-16 minute demo run."""
    import sparsellm.cli as cli

    monkeypatch.setattr(cli.prune, "run", lambda args: pytest.fail("a bare prune must not run"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: sparsellm prune --model MODEL") and "--help" in err[0]
    assert err[1].startswith("sparsellm: error:") and "--model" in err[1] and len(err) == 2


@pytest.mark.parametrize("argv", [["demo"], ["--quiet", "demo"], ["demo", "--quiet"]])
def test_demo_is_a_short_dense_vs_sparse_run(argv, monkeypatch, capsys):
    import sparsellm.runs.prune as runs_prune

    seen = []

    class Record:
        def to_dict(self):
            return {}

    monkeypatch.setattr(runs_prune, "run_prune", lambda cfg, progress: seen.append((cfg, progress)) or Record())
    monkeypatch.setattr("sparsellm.report.terminal", lambda run: "table")
    from sparsellm.cli import main

    assert main(argv) == 0
    ((cfg, progress),) = seen
    assert cfg.source.model == "smollm2-135m" and (cfg.prune.prune_method, cfg.prune.sparsity_ratio) == ("wanda", 0.5)
    assert cfg.prune.calibration.nsamples * cfg.prune.calibration.seqlen <= 32 * 512
    assert (cfg.evaluation.eval, cfg.evaluation.max_windows, cfg.evaluation.eval_dense) == ("wikitext2", 4, True)
    assert cfg.output.out is None and cfg.output.save is None  # writes nothing
    assert progress is ("--quiet" not in argv)
    assert capsys.readouterr().out.strip() == "table"


def test_help_states_each_default_once():
    """Every option's help shows its default at most once, and a real default (not None/False) at least once."""
    import argparse

    from sparsellm.cli import build_parser

    def actions(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    yield from actions(sp)
            elif a.help and a.option_strings and a.dest != "help":
                yield p, a

    seen, seen_zero = 0, False
    for p, a in actions(build_parser()):
        text = p.formatter_class("x")._get_help_string(a) % {"default": a.default}
        assert text.count("default") <= 1, (a.option_strings, text)
        if a.default is not None and a.default is not False and a.default != "" and \
                a.default is not argparse.SUPPRESS and isinstance(a.default, (int, float, str)):
            assert "default" in text, (a.option_strings, text)
            seen += 1
        if a.option_strings == ["--seed"]:  # 0 is a real default, though 0 == False
            assert "(default: 0)" in text, text
            seen_zero = True
    assert seen > 20 and seen_zero


@pytest.mark.parametrize("extra,match", [(["--seqlen", "1"], "--seqlen must be >= 2, got 1"),
                                         (["--nsamples", "0"], "--nsamples must be >= 1, got 0")])
def test_too_small_sizes_name_their_minimum(capsys, cli_env, extra, match):
    assert match in _bad(capsys, cli_env, extra)
