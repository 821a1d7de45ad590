"""Catastrophic quality is never silent: a perplexity far above dense, or a block where the cumulative
reconstruction error explodes, gives a warning that names the block and the likely cause, on stderr, in the
run record (`warnings`), in report.md, in the terminal summary and in `sparsellm report`."""

from __future__ import annotations

import json
import logging

import pytest

from sparsellm import checks
from sparsellm.cli import main


def _blocks(cum, local=None):
    local = local or [0.1] * len(cum)
    return [{"block": i, "target": 0.7, "rel_error": le, "cum_error": c} for i, (c, le) in enumerate(zip(cum, local))]


# SmolLM2-135M SparseGPT 50% uniform, cumulative error of blocks 0..29 (bench/results/layerwise_sparsegpt50.json,
# rounded): a healthy curve, whose largest step is 1.59× at block 28.
HEALTHY = [0.160, 0.176, 0.187, 0.199, 0.206, 0.214, 0.222, 0.229, 0.236, 0.243, 0.249, 0.201, 0.205, 0.209,
           0.213, 0.218, 0.222, 0.227, 0.231, 0.236, 0.240, 0.245, 0.250, 0.255, 0.260, 0.235, 0.230, 0.226,
           0.360, 0.381]


@pytest.mark.parametrize("cum,warned", [
    (HEALTHY, []),
    ([0.1, 0.12, 0.3, 0.32], [2]),        # 2.5× and above 0.25
    ([0.01, 0.05, 0.06], []),             # 5× but tiny
    ([0.1, 0.24, 0.26], []),              # 2.4× but below 0.25, then 1.08×
    ([0.6, 0.9, 1.05, 1.1, 0.95, 1.2], [2, 5]),  # reaches 1 (twice: it fell below in between)
    ([1.3, 1.4], [0]),                    # block 0 already at 1.3
    ([0.3, 1.2, 1.3], [1]),               # jumps 4× to above 1: one warning
    ([0.0, 0.4], [1]),                    # from exactly 0
])
def test_block_warnings_thresholds(cum, warned):
    out = checks.block_warnings(_blocks(cum))
    assert [int(w.split(":")[0].split()[1]) for w in out] == warned


def test_block_warning_names_the_block_and_the_likely_cause():
    jump, amplified = checks.block_warnings(_blocks([0.1, 0.12, 0.5, 0.55, 1.4], local=[0.1, 0.1, 0.8, 0.1, 0.2]))
    assert jump.startswith("block 2: the cumulative reconstruction error jumps from 0.12 (block 1) to 0.5, 4.2×")
    assert "likely cause: this block's own pruning (local error 0.8 at sparsity 0.7)" in jump
    assert amplified.startswith("block 4: the cumulative reconstruction error jumps from 0.55 (block 3) to 1.4")
    assert "likely cause: the earlier blocks' error amplified here (its local error is only 0.2):" in amplified
    # magnitude 80% on SmolLM2 (rounded): high from block 0 on, crossing 1 only at block 28
    cum = [0.74, 0.65, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79, 0.77, 0.76, 0.75] + [0.90] * 16 + [0.95, 1.10, 1.01]
    local = [0.74, 0.51, 0.41] + [0.45] * 25 + [0.41, 0.60]
    (w,) = checks.block_warnings(_blocks(cum, local))
    assert w.startswith("block 28: the cumulative reconstruction error reaches 1.1 (≥ 1")
    assert ("the earlier blocks' error amplified here (its local error is only 0.41; half of it was already "
            "there at block 0 (0.74, local error 0.74))") in w
    assert checks.block_warnings([{"block": 0, "target": 0.5, "rel_error": None, "cum_error": None}]) == []


def _ppl(x):
    return {"ppl": x, "windows": 4}


PRUNE = {"method": "magnitude", "target_sparsity": 0.8, "sparsity_type": "unstructured", "warnings": []}


def test_ppl_warnings_thresholds():
    dense = {"wikitext2_ppl@2048": _ppl(30.9)}
    (w,) = checks.ppl_warnings({"wikitext2_ppl@2048": _ppl(133776.0)}, dense, 49152, PRUNE)
    assert w.startswith("wikitext2_ppl@2048 1.338e+05 is 4,329× the dense model's 30.9 (threshold 10×)")
    assert "likely cause: sparsity 0.8 (unstructured) is too high for magnitude" in w
    assert checks.ppl_warnings({"wikitext2_ppl@2048": _ppl(309.0)}, dense, 49152, PRUNE) == []  # 10.0×
    assert len(checks.ppl_warnings({"wikitext2_ppl@2048": _ppl(309.1)}, dense, 49152, PRUNE)) == 1
    assert len(checks.ppl_warnings({"wikitext2_ppl@2048": _ppl(float("inf"))}, dense, 49152, PRUNE)) == 1
    # no dense value: above the vocabulary size, i.e. worse than a uniform guess
    (w,) = checks.ppl_warnings({"c4_ppl@2048": _ppl(60000.0)}, {}, 49152, PRUNE)
    assert w.startswith("c4_ppl@2048 60,000 is above the vocabulary size 49,152")
    assert checks.ppl_warnings({"c4_ppl@2048": _ppl(40000.0)}, {}, 49152, PRUNE) == []
    assert checks.ppl_warnings({"zeroshot": {"mean_acc": 0.2}}, {}, 49152, PRUNE) == []
    exploded = dict(PRUNE, warnings=["block 7: the cumulative reconstruction error jumps ..."])
    (w,) = checks.ppl_warnings({"wikitext2_ppl@2048": _ppl(1000.0)}, dense, None, exploded)
    assert "is too high for magnitude on this model (see the warning for block 7)" in w


def test_cli_warnings_reach_stderr_record_reports_and_report_command(tmp_path, saved_model_dir, calib_txt, capsys,
                                                                     caplog, monkeypatch):
    """The plumbing, with thresholds lowered so that a tiny random model trips both rules."""
    monkeypatch.setattr(checks, "PPL_FACTOR", 1e-3)
    monkeypatch.setattr(checks, "CUM_LOST", 1e-6)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="sparsellm"):
        code = main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                     "--nsamples", "2", "--seqlen", "16", "--prune_method", "wanda", "--eval", "wikitext2",
                     "--eval_seqlen", "32", "--max_windows", "1", "--eval_dense", "--out", str(out)])
    assert code == 0
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logged[0].startswith("sparsellm: warning: block 0: the cumulative reconstruction error reaches")
    assert logged[1].startswith("sparsellm: warning: wikitext2_ppl@32 ")
    assert "× the dense model's" in logged[1] and "(see the warning for block 0)" in logged[1]
    run = json.loads((out / "report.json").read_text())
    assert run["warnings"] == [m[len("sparsellm: warning: "):] for m in logged]
    assert run["prune"]["warnings"] == run["warnings"][:1]
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    for w in run["warnings"]:
        assert f"**warning**: {w}" in stdout and f"**warning**: {w}" in md
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "**warnings**" in table
    for w in run["warnings"]:
        assert f"- {out}: {w}" in table


def test_no_warnings_on_a_healthy_run(tmp_path, saved_model_dir, calib_txt, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--prune_method", "wanda", "--sparsity_ratio", "0.1",
                 "--eval", "none", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["warnings"] == []
    assert "**warning**" not in capsys.readouterr().out
