"""Item 19 of issue 20: the terminal summary after `prune` names the allocation with its β or λ, and
ppl_vs_sparsity.png has a title and a legend that names each run's pattern (2:4 against unstructured)."""

from __future__ import annotations

import pytest

from sparsellm import plots
from sparsellm.cli import main


@pytest.mark.parametrize("extra,phrase", [
    (["--allocation", "atp", "--atp_beta", "0.2"], "allocation **atp** (β = 0.2)"),
    (["--allocation", "owl", "--owl_lambda", "0.05"], "allocation **owl** (M = 5, λ = 0.05, granularity = block)"),
    (["--allocation", "uniform"], "allocation **uniform**"),
])
def test_prune_summary_names_the_allocation_and_its_setting(capsys, saved_model_dir, calib_txt, extra, phrase):
    capsys.readouterr()
    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--eval", "none", *extra]) == 0
    assert phrase in capsys.readouterr().out


def test_ppl_vs_sparsity_has_a_title_and_names_the_pattern(monkeypatch, tmp_path):
    seen = {}

    def keep(fig, path):
        ax = fig.axes[0]
        seen["title"] = ax.get_title()
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return path

    monkeypatch.setattr(plots, "_save", keep)
    row = {"method": "wanda", "allocation": "uniform", "measured": 0.5, "target": 0.5}
    rows = [{**row, "sparsity_type": "unstructured", "ppl": {"wikitext2_ppl@32": 30.0}},
            {**row, "sparsity_type": "2:4", "ppl": {"wikitext2_ppl@32": 60.0}},
            {**row, "measured": 0.6, "sparsity_type": "unstructured", "ppl": {"wikitext2_ppl@32": 40.0}}]
    plots.ppl_vs_sparsity(rows, "wikitext2_ppl@32", tmp_path / "p.png")
    assert "wikitext2_ppl@32" in seen["title"] and "sparsity" in seen["title"]
    assert sorted(seen["legend"]) == ["wanda uniform, 2:4", "wanda uniform, unstructured"]


def test_block_table_says_when_the_cumulative_error_was_off():
    from sparsellm.report import block_table

    row = {"block": 0, "target": 0.5, "measured": 0.5, "rel_error": 0.01, "seconds": 1.0}
    off = block_table({"blocks": [{**row, "cum_error": None}, {**row, "block": 1, "cum_error": None}]})
    assert "--diag_nsamples" in off and off.count("| — |") == 2
    on = block_table({"blocks": [{**row, "cum_error": 0.02}, {**row, "block": 1, "cum_error": 0.03}]})
    assert "--diag_nsamples" not in on and "2.000e-02" in on
