"""Layer-wise sparsity on tiny models: the reconstruction-error diagnostic, OWL and RMI statistics from the
dense pre-pass, per-layer rates, every allocator with every pruner, and ATP's β search."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import FAMILIES, make_model
from sparsellm.allocate import atp
from sparsellm.allocate import resolve_allocation
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.allocate.atp_search import beta_grid, search
from sparsellm.engine import prune_blocks
from sparsellm.errors import UsageError
from sparsellm.evaluate import perplexity

NS, SL = 4, 16


def _ids(n=NS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (n, SL), generator=g)


def _linears(block):
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def _block_outputs(model, ids):
    """Outputs of every decoder block for each window, recorded with forward hooks on a full forward."""
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(
        (o[0] if isinstance(o, tuple) else o).detach().clone())) for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(ids[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in outs.items()}


# ------------------------------------------------------------------ reconstruction-error diagnostic


@pytest.mark.parametrize("family", FAMILIES)
def test_diagnostic_is_zero_at_sparsity_zero(family):
    model = make_model(family)
    L = len(model.model.layers) if family != "opt" else len(model.model.decoder.layers)
    res = prune_blocks(model, _ids(), "wanda", [0.0] * L, progress=False, diag_nsamples=2)
    assert all(r["rel_error"] == 0.0 and r["cum_error"] == 0.0 for r in res)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_cumulative_error_matches_full_model_forwards(method):
    """cum_error of block i = ‖Y_i(dense model) − Y_i(pruned model)‖ / ‖Y_i(dense model)‖ on the first k
    windows, computed here from two plain full-model forwards."""
    model = make_model("llama", num_hidden_layers=3)
    ids = _ids()
    dense = _block_outputs(model, ids[:2])
    res = prune_blocks(model, ids, method, [0.3, 0.5, 0.7], progress=False, diag_nsamples=2,
                       options={"blocksize": 16})
    pruned = _block_outputs(model, ids[:2])
    for i, r in enumerate(res):
        want = float((dense[i] - pruned[i]).norm() / dense[i].norm())
        assert r["cum_error"] == pytest.approx(want, rel=1e-4, abs=1e-6), i
        assert r["rel_error"] is not None and r["rel_error"] > 0
    # the first block sees the same inputs in both models: local error equals cumulative error there
    # (over the same windows for magnitude, which runs forwards on the diagnostic windows only)
    if method == "magnitude":
        assert res[0]["rel_error"] == pytest.approx(res[0]["cum_error"], rel=1e-4)
    assert res[-1]["cum_error"] > res[0]["cum_error"]


def test_no_diagnostic_means_no_forwards_for_magnitude(monkeypatch):
    import sparsellm.engine as engine

    model = make_model("llama")
    monkeypatch.setattr(engine, "capture_inputs", lambda *a, **k: pytest.fail("forward run"))
    res = prune_blocks(model, _ids(), "magnitude", [0.5, 0.5], progress=False)
    assert all(r["cum_error"] is None and r["rel_error"] is None for r in res)


def test_per_layer_rates_dict():
    model = make_model("llama")
    names = list(_linears(model.model.layers[0]))
    rates = [{n: 0.25 + 0.05 * k for k, n in enumerate(names)}, {n: 0.5 for n in names}]
    res = prune_blocks(model, _ids(), "wanda", rates, progress=False)
    for i, block in enumerate(model.model.layers):
        for n, lin in _linears(block).items():
            assert int((lin.weight == 0).sum()) == lin.out_features * int(lin.in_features * rates[i][n]), n
            assert res[i]["modules"][n]["target"] == rates[i][n]
    w = {n: lin.weight.numel() for n, lin in _linears(model.model.layers[0]).items()}
    assert res[0]["target"] == pytest.approx(sum(rates[0][n] * w[n] for n in names) / sum(w.values()))


# ------------------------------------------------------------------ OWL and RMI statistics


def _input_sq_norms(model, ids):
    """Σ_t x_t² per input feature of every block linear, from hooks on full dense forwards."""
    acc = {}
    hooks = []
    for i, b in enumerate(model.model.layers):
        for n, lin in _linears(b).items():
            def hook(m, a, o, key=(i, n)):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                acc[key] = acc.get(key, 0) + (x * x).sum(0)
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(ids[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return acc


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_owl_outlier_ratios_from_the_dense_model(granularity, tokenizer):
    model = make_model("llama", num_hidden_layers=3)
    ids = _ids()
    norms = _input_sq_norms(model, ids)
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, allocation="owl", owl_m=2.0, owl_lambda=0.1,
                      owl_granularity=granularity, nsamples=NS, seqlen=SL)
    before = copy.deepcopy(model.state_dict())
    rates, info = resolve_allocation(model, cfg, ids, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the pre-pass prunes nothing

    def lod(scores):
        a = np.concatenate([s.ravel() for s in scores])
        return 100.0 * np.mean(a > 2.0 * a.mean())

    want = []
    for i, b in enumerate(model.model.layers):
        scores = {n: (lin.weight.detach().double().abs() * norms[(i, n)].sqrt()).numpy() for n, lin in _linears(b).items()}
        want += [lod(scores.values())] if granularity == "block" else [lod([s]) for s in scores.values()]
    assert info["outlier_ratio"] == pytest.approx(want, abs=1e-3)
    assert sum(info["rates"]) / 3 == pytest.approx(0.5, abs=1e-4)
    assert all(0.4 - 1e-9 <= r <= 0.6 + 1e-9 for r in info["rates"])
    if granularity == "block":  # more outliers, less sparsity
        order = np.argsort(want)
        assert all(rates[order[k]] >= rates[order[k + 1]] - 1e-12 for k in range(2))
    else:
        assert all(isinstance(r, dict) for r in rates)


def test_rmi_cka_from_the_dense_model(tokenizer):
    model = make_model("llama", num_hidden_layers=4)
    ids = _ids(6)
    with torch.no_grad():
        hs = [torch.cat([model(ids[s:s + 1], output_hidden_states=True).hidden_states[i] for s in range(6)])
              for i in range(4)]  # hidden_states[i] = inputs of block i

    def centred_gram(X):
        F = X.reshape(X.shape[0], -1).double().numpy()
        K = F @ F.T
        H = np.eye(len(K)) - 1.0 / len(K)
        return H @ K @ H

    G = [centred_gram(x) for x in hs]
    want = np.array([[np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b) for b in G] for a in G])
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, allocation="rmi", rmi_nsamples=6, nsamples=NS,
                      seqlen=SL)
    rates, info = resolve_allocation(model, cfg, ids, progress=False)
    np.testing.assert_allclose(np.array(info["cka"]), want, atol=1e-5)
    assert sum(rates) / 4 == pytest.approx(0.6, abs=1e-9)
    assert sorted(round(r, 9) for r in rates) == [0.58, 0.58, 0.62, 0.62]
    red = want.sum(1) - 1.0  # Σ_{j≠i} CKA(i, j): the more redundant half gets S + δ
    assert {int(k) for k in np.argsort(red)[2:]} == {i for i, r in enumerate(rates) if r > 0.6}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["uniform", "atp", "owl", "rmi"])
def test_every_allocator_with_every_pruner(method, allocation, tokenizer):
    model = make_model("qwen2", num_hidden_layers=3)
    cfg = PruneConfig.from_flat(prune_method=method, sparsity_ratio=0.6, nsamples=NS, seqlen=SL, allocation=allocation,
                      atp_beta=0.05 if allocation == "atp" else 0.0, owl_m=2.0 if allocation == "owl" else 5.0,
                      diag_nsamples=2, **({"blocksize": 16} if method == "sparsegpt" else {}))
    report = prune(model, tokenizer, cfg, calib_ids=_ids(), progress=False)
    rates = report["allocation"]["rates"]
    assert sum(rates) / 3 == pytest.approx(0.6, abs=1e-9)
    for b, r in zip(report["blocks"], rates):
        assert b["target"] == pytest.approx(r)
        assert b["measured"] == pytest.approx(r, abs=0.04)  # per-row floor on 32-64 wide rows
        assert b["cum_error"] is not None
    assert report["measured"]["sparsity"] == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize("kwargs,match", [
    (dict(allocation="owl", owl_lambda=0.6), "λ"),
    (dict(allocation="owl", sparsity_ratio=0.95, owl_lambda=0.08), "λ"),
    (dict(allocation="owl", owl_m=0.0), "owl_m"),
    (dict(allocation="owl", owl_granularity="row"), "granularity"),
    (dict(allocation="rmi", rmi_delta=0.6), "δ"),
    (dict(allocation="rmi", rmi_nsamples=0), "rmi_nsamples"),
    (dict(diag_nsamples=-1), "diag_nsamples"),
])
def test_bad_allocation_settings(kwargs, match):
    cfg = dict(prune_method="wanda", sparsity_ratio=0.5)
    cfg.update(kwargs)
    with pytest.raises(UsageError, match=match):
        PruneConfig.from_flat(**cfg).validate()


# ------------------------------------------------------------------ ATP β search


@pytest.mark.parametrize("strategy,tried", [("grid", 4), ("golden", 3)])
def test_search_refuses_to_choose_when_every_trial_diverges(tokenizer, monkeypatch, strategy, tried):
    """All objectives inf or NaN: one clear error instead of a silent choice of β = 0 (and no log-scale plot
    of nothing)."""
    import sparsellm.allocate.atp_search

    seen = []

    def diverged(*args, **kwargs):
        seen.append(1)
        return {"ppl": float("nan") if len(seen) % 2 else float("inf"), "metric": "wikitext2_ppl@32",
                "total_windows": 1}

    monkeypatch.setattr(sparsellm.allocate.atp_search, "perplexity", diverged)
    model = make_model("llama", num_hidden_layers=3, max_position_embeddings=256)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=f"every β tried gave an infinite or NaN objective \\({tried} of 4 grid"):
        search(model, tokenizer, _ids(), "magnitude", 0.6, step=0.1, objective="wikitext2", objective_windows=1,
               objective_seqlen=32, progress=False, strategy=strategy)
    assert len(seen) == tried  # grid: every β was tried
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_beta_grid():
    g = beta_grid(30, 0.7, 0.002)
    assert g[0] == 0.0 and len(g) == 11 and g[-1] == pytest.approx(0.020)  # β_max = 0.6/29 = 0.02069
    assert all(b - a == pytest.approx(0.002) for a, b in zip(g, g[1:]))
    assert beta_grid(3, 0.5, 0.25) == [0.0, 0.25]  # β_max = 0.5 would make the last block fully sparse
    with pytest.raises(UsageError, match="atp_step"):
        beta_grid(30, 0.5, 0.0)


def test_search_scores_every_beta_and_restores_the_model(tokenizer):
    model = make_model("llama", num_hidden_layers=3, max_position_embeddings=256)
    before = copy.deepcopy(model.state_dict())
    ids = _ids()
    rep = search(model, tokenizer, ids, "wanda", 0.6, step=0.1, objective="wikitext2", objective_windows=2,
                 objective_seqlen=32, progress=False, strategy="grid")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [t["beta"] for t in rep["trials"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert rep["objective"]["test_set_selection"] is True
    best = min(rep["trials"], key=lambda t: t["objective"])
    assert rep["best_beta"] == best["beta"]
    # each trial's objective equals an independent prune of a fresh copy with that β, scored the same way
    for t in rep["trials"][::3]:
        m = copy.deepcopy(model)
        prune(m, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, allocation="atp",
                                        atp_beta=t["beta"], nsamples=NS, seqlen=SL, diag_nsamples=0),
              calib_ids=ids, progress=False)
        ppl = perplexity(m, tokenizer, "wikitext2", 32, 2, progress=False)["ppl"]
        assert t["objective"] == pytest.approx(ppl, rel=1e-5)
    assert math.isfinite(rep["search_seconds"]) and rep["one_prune_seconds"] > 0


# ------------------------------------------------------------------ command line


def test_cli_allocate_search_writes_rates_plots_and_model(capsys, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    save, out = tmp_path / "rep", tmp_path / "pruned"
    code = main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--allocation", "atp", "--search", "--atp_step", "0.2",
                 "--atp_search", "grid", "--sparsity_ratio", "0.5", "--objective", "wikitext2", "--objective_windows", "1",
                 "--eval", "wikitext2", "--eval_seqlen", "32", "--max_windows", "1", "--save", str(save),
                 "--save_model", str(out)])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((save / "report.json").read_text())
    assert [t["beta"] for t in rep["search"]["trials"]] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    printed = capsys.readouterr().out  # the chosen β and every trial are printed even under --quiet
    lines = printed.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("ATP search:"))
    assert lines[at + 1].startswith("rates: ")
    assert f"β = {rep['search']['best_beta']:.4f} chosen" in lines[at]
    assert "wikitext2_ppl@32 on 1 window (test-set selection)" in lines[at]
    assert lines[at].endswith(", ".join(f"{t['beta']:.4f}: {t['objective']:.6g}" for t in rep["search"]["trials"]))
    rates = json.loads((save / "rates.json").read_text())
    beta = rep["search"]["best_beta"]
    assert rates == pytest.approx([0.5 - beta / 2, 0.5 + beta / 2])
    assert rep["prune"]["allocation"]["atp_beta"] == beta
    assert "test-set selection" in (save / "report.md").read_text()
    for d in (save, out):
        for png in ("errors.png", "atp_search.png"):
            assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (d, png)
    sc = json.loads((out / "sparsity_config.json").read_text())
    assert sc["allocation"]["rates"] == pytest.approx(rates)


@pytest.mark.parametrize("num_blocks,target,step", [(31, 0.82, 0.002), (21, 0.57, 0.001)])
def test_beta_grid_leaves_out_a_last_rate_that_rounds_to_one(num_blocks, target, step):
    """Above 50% the nominal β_max can give the last block 0.9999999999999999 in floating point; a row mask
    would then prune all but one weight per row, so that β is not on the grid."""
    grid = beta_grid(num_blocks, target, step)
    last = atp.allocate(num_blocks, target, atp_beta=grid[-1])[-1]
    assert last < 1 - 1e-6
    assert grid[-1] + step > atp.beta_max(num_blocks, target) - 1e-12  # nothing else was dropped


def test_cli_search_counts_trials_on_the_models_depth(capsys, tmp_path, tokenizer, calib_txt, monkeypatch):
    """The trial cap is checked against the real number of blocks, not a placeholder depth: with the cap at 10,
    step 0.05 gives 4 trials for 6 blocks at 50% (β_max = 1/5 is left out) and runs; step 0.015 (14 trials) and
    steps so small that the count overflows an int are refused with one line, before any dense evaluation."""
    import sparsellm.allocate.atp_search
    from sparsellm.cli import main

    monkeypatch.setattr(sparsellm.allocate.atp_search, "MAX_TRIALS", 10)
    d = tmp_path / "deep"
    make_model("llama", num_hidden_layers=6).save_pretrained(d)
    tokenizer.save_pretrained(d)
    args = ["--quiet", "allocate", "--model", str(d), "--calib_dataset", str(calib_txt), "--nsamples", "1",
            "--seqlen", "16", "--prune_method", "magnitude", "--allocation", "atp", "--search", "--sparsity_ratio",
            "0.5", "--objective", "wikitext2", "--objective_windows", "1", "--objective_seqlen", "16", "--atp_search",
            "grid", "--eval", "none"]
    assert main([*args, "--atp_step", "0.05", "--save", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert [t["beta"] for t in rep["search"]["trials"]] == pytest.approx([0.0, 0.05, 0.1, 0.15])  # 0.2 = β_max
    capsys.readouterr()
    bad = [*args[:-2], "--eval", "wikitext2", "--eval_dense", "--eval_seqlen", "16", "--max_windows", "1"]
    for step in ("0.015", "1e-300", "5e-324"):  # refused after loading but before calibration and the dense eval
        assert main([*bad, "--atp_step", step, "--save", str(tmp_path / "bad")]) == 2
        cap = capsys.readouterr()
        assert "more than 10 trials" in cap.err and len(cap.err.splitlines()) == 1, cap.err
        assert "ppl" not in cap.out + cap.err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra,match", [
    (["--allocation", "owl", "--search"], "--search"),
    (["--allocation", "atp", "--search", "--atp_beta", "0.1"], "atp_beta"),
    (["--allocation", "atp", "--search", "--atp_step", "0"], "atp_step"),
    (["--allocation", "atp", "--search", "--objective_windows", "0"], "objective_windows"),
    (["--allocation", "owl", "--owl_lambda", "0.7"], "λ"),
])
def test_cli_allocate_bad_input(capsys, tmp_path, saved_model_dir, calib_txt, extra, match):
    from sparsellm.cli import main

    code = main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--save", str(tmp_path / "rep"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sparsellm: error:") and match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "rep").exists()


def test_cli_plot_errors(capsys, monkeypatch, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    for alloc in ("uniform", "atp"):
        extra = ["--atp_beta", "0.2"] if alloc == "atp" else []
        assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                     "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--allocation", alloc, *extra,
                     "--save", str(tmp_path / alloc)]) == 0
    out = tmp_path / "fig" / "errors.png"
    assert main(["plot-errors", str(tmp_path / "uniform" / "report.json"), str(tmp_path / "atp"),
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    for argv, match in [([str(tmp_path / "nope.json")], "not found"),
                        ([str(calib_txt)], "is not valid JSON"),
                        ([str(tmp_path / "atp"), "--labels", "a,b"], "2 labels for 1"),
                        ([str(tmp_path / "atp"), "--out", str(tmp_path / "x.txt")], ".png")]:
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "e.png")]
        assert main(["plot-errors", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparsellm: error:") and match in err, err
    assert not (tmp_path / "e.png").exists()
    (tmp_path / "d" / "report.json").mkdir(parents=True)  # a directory where the report should be
    assert main(["plot-errors", str(tmp_path / "d"), "--out", str(tmp_path / "e.png")]) == 2
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "e.png").exists()
    for i in (1, 2, 3):  # same default label and same folder name: every curve is kept
        (tmp_path / f"r{i}" / "x").mkdir(parents=True)
        (tmp_path / f"r{i}" / "x" / "report.json").write_bytes((tmp_path / "atp" / "report.json").read_bytes())
    from sparsellm import plots
    seen = {}
    monkeypatch.setattr(plots, "error_curves", lambda runs, out, title=None: seen.update(runs))
    assert main(["plot-errors", *(str(tmp_path / f"r{i}" / "x") for i in (1, 2, 3)), "--out", str(out)]) == 0
    assert len(seen) == 3


def test_rates_file_mean_mismatch_only_when_asked(capsys, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    f = tmp_path / "rates.json"
    f.write_text("[0.3, 0.5]")
    base = ["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
            "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--sparsity_ratio", "0.5",
            "--allocation", f"file:{f}", "--save", str(tmp_path / "rep")]
    assert main(base) == 2
    assert "mean" in capsys.readouterr().err and not (tmp_path / "rep").exists()
    assert main(base + ["--allow_mean_mismatch"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [b["target"] for b in rep["prune"]["blocks"]] == pytest.approx([0.3, 0.5])
    assert main(base[:-4] + ["--allow_mean_mismatch"]) == 2  # only for a rates file


@pytest.mark.parametrize("step,match", [(float("inf"), "finite"), (float("nan"), "finite"), (1e-300, "trials")])
def test_atp_step_degenerate(step, match):
    with pytest.raises(UsageError, match=match):
        beta_grid(30, 0.7, step)


@pytest.mark.parametrize("kwargs", [dict(owl_lambda=0.05), dict(owl_granularity="layer"), dict(rmi_delta=0.01),
                                    dict(rmi_nsamples=8)])
def test_allocator_flags_need_their_allocator(kwargs):
    with pytest.raises(UsageError, match="appl(y|ies) only"):
        PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, allocation="atp", **kwargs).validate()


def test_save_may_not_overwrite_the_rates_file(capsys, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    d = tmp_path / "rr"
    d.mkdir()
    (d / "rates.json").write_text('{"0": 0.4, "1": 0.6}')
    code = main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--allocation", f"file:{d / 'rates.json'}",
                 "--save", str(d)])
    assert code == 2 and "overwrite the input" in capsys.readouterr().err
    assert (d / "rates.json").read_text() == '{"0": 0.4, "1": 0.6}' and len(list(d.iterdir())) == 1


def test_objective_also_evaluated_is_flagged(capsys, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--allocation", "atp", "--search", "--atp_step", "0.4",
                 "--objective", "c4", "--objective_windows", "1", "--objective_seqlen", "32", "--eval", "c4",
                 "--eval_seqlen", "32", "--max_windows", "1", "--save", str(tmp_path / "s")]) == 0
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["search"]["objective"]["also_evaluated"] is True
    assert "not held out" in (tmp_path / "s" / "report.md").read_text()


def test_search_line_keeps_fine_grid_betas_distinct():
    """A step below 1e-4 (allowed for deep models or targets near 0 or 1) still prints one label per trial."""
    from sparsellm.report import search_line, search_table

    betas = beta_grid(32, 0.99, 0.00002)
    rep = {"best_beta": betas[3], "beta_max": atp.beta_max(32, 0.99), "step": 0.00002,
           "trials": [{"beta": b, "objective": 10.0 + i, "prune_seconds": 1.0, "seconds": 2.0}
                      for i, b in enumerate(betas)],
           "objective": {"dataset": "c4", "windows": 4, "metric": "c4_ppl@2048", "test_set_selection": False},
           "search_seconds": 60.0, "one_prune_seconds": 1.0}
    labels = [x.split(":")[0] for x in search_line(rep).split(": ", 2)[2].split(", ")]
    assert len(set(labels)) == len(betas) > 10
    assert f"β = {betas[3]:.6f} chosen" in search_line(rep)
    rows = [r for r in search_table(rep).splitlines() if r.startswith("| 0.")]
    assert len({r.split(" |")[0] for r in rows}) == len(betas)


def test_plot_errors_on_a_save_pruned_directory_says_what_it_is(tmp_path):
    """save_pruned writes the bare prune report (allocation, blocks, no `prune` section): plot-errors must not
    call it "a run that pruned nothing"."""
    import json

    from sparsellm.plots import plot_reports

    d = tmp_path / "saved"
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"method": "wanda", "allocation": {"name": "uniform", "rates": [0.5]},
                                               "blocks": [{"block": 0, "rel_error": 0.1, "cum_error": 0.1}]}))
    with pytest.raises(UsageError, match="is not a sparsellm prune report"):
        plot_reports([str(d)], tmp_path / "e.png")
    (d / "report.json").write_text(json.dumps({"command": "allocate", "allocation": {"name": "owl", "rates": [0.5]}}))
    with pytest.raises(UsageError, match="pruned nothing"):
        plot_reports([str(d)], tmp_path / "e.png")
