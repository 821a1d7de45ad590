"""DLP, AlphaPruning, LSA and ATP+DLP (issue 23) against small direct computations written out here: DLP's
code steps, the Hill estimate on a Pareto spectrum and the xmin_peak rule by hand, LSA's greedy error by a
plain loop and by ‖(W − Ŵ)Xᵀ‖², AlphaPruning's ww_sparsity; the mean, the bounds, the degenerate cases, and
per-linear rates on the saved model's modules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_model
from sparsellm.allocate import alphapruning, atp, atp_dlp, dlp, lsa, minmax, resolve_allocation
from sparsellm.errors import UsageError
from sparsellm.pipeline import PruneConfig

# ---------------------------------------------------------------- DLP


def _dlp_code(U, S, alpha):
    """ironartisan/DLP get_dlp_ratios, step by step (allocators-engines-kernels.md §1.2)."""
    U = np.abs(np.asarray(U, dtype=np.float64))
    imp = 1 - U / U.sum()
    imp = 2 * alpha * (imp - imp.min()) / (imp.max() - imp.min())
    keep = (1 - S) + imp - imp.mean()
    return 1 - keep


@pytest.mark.parametrize("S,alpha", [(0.7, 0.15), (0.5, 0.1), (0.6, 0.0)])
def test_dlp_rates_are_the_codes_steps(S, alpha):
    U = np.random.default_rng(0).uniform(0.5, 3.0, 12)
    got = dlp.rates_from_scores(U, S, alpha)
    want = _dlp_code(U, S, alpha) if alpha > 0 else np.full(12, S)
    assert got == pytest.approx(want.tolist(), abs=1e-12)
    assert np.mean(got) == pytest.approx(S, abs=1e-15)
    if alpha:
        assert max(got) - min(got) == pytest.approx(2 * alpha)  # exactly 2α wide
        assert np.argmax(got) == np.argmax(U) and np.argmin(got) == np.argmin(U)  # sparsity grows with U


def test_dlp_block_score_is_the_mean_of_the_concatenation_and_the_median_variant():
    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(6, 5, generator=g), torch.rand(3, 7, generator=g), torch.rand(4, generator=g)]
    flat = np.concatenate([p.numpy().ravel() for p in parts])  # 55 entries: an odd count, one median
    assert dlp.block_score(parts) == pytest.approx(float(np.mean(flat.astype(np.float64))), rel=1e-12)
    assert dlp.block_score(parts, "median") == pytest.approx(float(np.median(flat)), rel=1e-7)


def test_dlp_scores_from_the_dense_model_match_hooks():
    model = make_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    sq = {}
    hooks = []
    for i, b in enumerate(model.model.layers):
        for n, m in b.named_modules():
            if isinstance(m, torch.nn.Linear):
                hooks.append(m.register_forward_hook(lambda mod, a, o, k=(i, n): sq.__setitem__(
                    k, sq.get(k, 0) + a[0].detach().double().reshape(-1, a[0].shape[-1]).square().sum(0))))
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(ids[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    want = []
    for i, b in enumerate(model.model.layers):
        scores = [(m.weight.detach().double().abs() * sq[(i, n)].sqrt()).numpy().ravel()
                  for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
        want.append(float(np.concatenate(scores).mean()))
    got = dlp.block_scores(model, ids, progress=False)
    assert got == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- the shared form: mean, bounds, degenerate


@pytest.mark.parametrize("form", ["recentre", "rescale"])
def test_shared_form_keeps_the_mean_and_bounds_when_it_clips(form):
    stat = np.r_[np.zeros(9), 1.0]  # skewed: one outlier block pushed to the top
    w = np.random.default_rng(2).uniform(1, 3, 10)
    s = minmax.recentre(stat, 0.8, 0.9, w) if form == "recentre" else minmax.rescale(stat, 0.8, 0.9, w)
    assert all(0 <= r <= minmax.MAX_RATE < 1 for r in s)
    assert np.dot(s, w) / w.sum() == pytest.approx(0.8, abs=1e-12)
    assert max(s) == minmax.MAX_RATE  # the clip was needed
    assert s[:9] == pytest.approx([s[0]] * 9)


@pytest.mark.parametrize("fn", [lambda st, S: dlp.rates_from_scores(st, S, 0.15),
                                lambda st, S: lsa.rates_from_errors(st, S),
                                lambda st, S: minmax.rescale(st, S, 0.3),
                                lambda st, S: atp_dlp.allocate(st, S, 0.0, 0.1)])
def test_one_block_and_equal_statistics_are_uniform(fn):
    assert fn([2.5], 0.7) == [0.7]
    assert fn([3.0] * 6, 0.6) == pytest.approx([0.6] * 6, abs=1e-15)


def test_rescale_is_ww_sparsity_when_nothing_clips():
    m = np.random.default_rng(3).uniform(2, 6, 8)
    N = np.array([4, 1, 4, 4, 1, 3, 3, 3], dtype=np.float64) * 1000
    S, eps = 0.5, 0.3
    r = (1 - eps) + 2 * eps * (m - m.min()) / (m.max() - m.min())
    want = r * S * N.sum() / (N * r).sum()  # haiquanlu/AlphaPruning lib/prune.py ww_sparsity
    got = minmax.rescale(m, S, eps, N)
    assert got == pytest.approx(want.tolist(), abs=1e-12)
    assert np.dot(got, N) / N.sum() == pytest.approx(S, abs=1e-15)


def test_alphapruning_block_wise_takes_the_block_mean_metric():
    metrics = [[3.0, 4.0, 5.0], [2.0, 2.0, 2.0], [6.0, 5.0, 7.0]]
    sizes = [[10, 10, 20]] * 3
    got = alphapruning.rates_from_metrics(metrics, sizes, 0.5, 0.2)
    mean = np.array([4.0, 2.0, 6.0])
    r = 0.8 + 0.4 * (mean - 2.0) / 4.0
    assert [g[0] for g in got] == pytest.approx((r * 0.5 / r.mean()).tolist(), abs=1e-12)
    assert all(len(set(g)) == 1 for g in got)
    layer = alphapruning.rates_from_metrics(metrics, sizes, 0.5, 0.2, "layer_wise")
    flat, w = np.concatenate(layer), np.concatenate(sizes)
    assert np.dot(flat, w) / w.sum() == pytest.approx(0.5, abs=1e-15) and len(set(layer[0])) == 3


# ---------------------------------------------------------------- AlphaPruning's Hill estimate


def test_hill_estimate_recovers_a_pareto_exponent():
    rng = np.random.default_rng(0)
    eigs = np.sort(rng.pareto(2.0, 4000) + 1.0)  # density ∝ λ^-3 above 1: exponent 3
    n = eigs.size
    direct = 1 + n / np.sum(np.log(eigs / eigs[0]))  # Hill with x_min = the smallest eigenvalue
    assert direct == pytest.approx(3.0, abs=0.1)
    for rule in ("xmin_peak", None):
        alpha, D = alphapruning.pl_alpha_hill(eigs, rule)
        assert alpha == pytest.approx(3.0, abs=0.15) and 0 <= D < 0.05


def test_xmin_peak_rule_on_a_hand_built_spectrum():
    # log10 λ spans [-1, 3] in 100 bins of 0.04: the fullest bin is the one holding the 40 values at 10^1.01
    eigs = np.sort(np.r_[0.1, 0.5, 1.0, 10 ** np.full(40, 1.01), 10 ** np.linspace(1.1, 3, 30)])
    lower, upper = alphapruning.xmin_peak_range(eigs)
    x_peak = 10 ** 1.0  # the left edge of bin 50 = -1 + 50 · 0.04
    assert upper == pytest.approx(1.5 * x_peak) and lower == pytest.approx(math.log10(0.95 * x_peak))
    # the reference's unit mix: the lower bound is log10(9.5) ≈ 0.978, so 1.0 (far below 0.95 · x_peak) is a
    # candidate while 0.1 and 0.5 are not; above, 10^1.1 and 10^1.166 are <= 15, 10^1.231 is not
    cands = [i for i in range(eigs.size - 1) if lower <= eigs[i] <= upper]
    assert len(cands) == 43 and eigs[cands[0]] == 1.0
    N, best = eigs.size, (1.0, 0.0)
    for i in cands:  # Hill and KS for each candidate, by hand
        n = N - i
        a = 1 + n / np.sum(np.log(eigs[i:] / eigs[i]))
        if a > 1:
            D = max(abs(1 - (eigs[i + t] / eigs[i]) ** (1 - a) - t / n) for t in range(n))
            if D < best[0]:
                best = (D, a)
    alpha, D = alphapruning.pl_alpha_hill(eigs)
    assert (alpha, D) == pytest.approx((best[1], best[0]), rel=1e-9)


def test_esd_is_the_squared_singular_values():
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    want = np.sort(np.linalg.eigvalsh((W.T @ W).double().numpy()))
    assert alphapruning.esd(W) == pytest.approx(want.tolist(), rel=1e-5)


# ---------------------------------------------------------------- LSA's statistic


def _greedy_by_hand(W, H, B, k):
    """One row at a time: pick the column whose removal adds the least to w_Pᵀ H w_P given the set P so far."""
    W, H = W.double().numpy(), H.double().numpy()
    total, mask = 0.0, np.zeros(W.shape, bool)
    for r in range(W.shape[0]):
        P = []
        for c0 in range(0, W.shape[1], B):
            for _ in range(min(k, min(c0 + B, W.shape[1]) - c0)):
                def added(j):
                    return W[r, j] ** 2 * H[j, j] + 2 * sum(W[r, j] * W[r, p] * H[p, j] for p in P)
                j = min((j for j in range(c0, min(c0 + B, W.shape[1])) if j not in P), key=added)
                total += added(j)
                P.append(j)
        mask[r, P] = True
    return total, mask


@pytest.mark.parametrize("B", [4, 0, 3])
def test_lsa_greedy_error_is_the_greedy_by_hand_and_the_output_error(B):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(5, 10, generator=g, dtype=torch.float64)
    X = torch.randn(40, 10, generator=g, dtype=torch.float64)
    H = X.T @ X
    E, mask = lsa.greedy_error(W, H, B, 0.5, return_mask=True)
    width = 10 if B == 0 else B
    want, want_mask = _greedy_by_hand(W, H, width, int(width * 0.5))
    assert E == pytest.approx(want, rel=1e-4)
    assert np.array_equal(mask.numpy(), want_mask)
    out_err = float(((W * mask) @ X.T).square().sum())  # ‖(W − Ŵ)Xᵀ‖², Ŵ = W with the mask zeroed
    assert E == pytest.approx(out_err, rel=1e-4)


def test_lsa_greedy_error_with_a_diagonal_hessian_is_the_smallest_half():
    g = torch.Generator().manual_seed(6)
    W, h = torch.randn(6, 8, generator=g), torch.rand(8, generator=g) + 0.1
    e = (W.square() * h).double().numpy()
    want = sum(np.sort(e[:, c:c + 4], axis=1)[:, :2].sum() for c in (0, 4))
    assert lsa.greedy_error(W, torch.diag(h), 4, 0.5) == pytest.approx(want, rel=1e-5)


def test_lsa_rates_are_the_codes_blk_score():
    E = np.random.default_rng(4).uniform(1, 9, 10)
    lam = lsa.lambda_for(0.7)
    assert lam == 0.15 and lsa.lambda_for(0.6) == 0.10 and lsa.lambda_for(0.95) == 0.08
    imp = 1 - E / E.sum()
    imp = (imp - imp.min()) / (imp.max() - imp.min()) * lam * 2
    want = 0.7 + imp.mean() - imp  # BeiYazi0/LSA layersp/blk.py blk_score
    assert lsa.rates_from_errors(E, 0.7) == pytest.approx(want.tolist(), abs=1e-12)


# ---------------------------------------------------------------- ATP + DLP


def test_atp_dlp_is_atp_at_alpha_zero_and_stays_monotone_with_mean_s():
    U = np.random.default_rng(7).uniform(1, 2, 12)
    bmax = atp.beta_max(12, 0.7)
    assert atp_dlp.allocate(U, 0.7, bmax / 2, 0.0) == pytest.approx(atp.allocate(12, 0.7, bmax / 2), abs=1e-12)
    s = atp_dlp.allocate(U, 0.7, bmax / 2, 0.1)
    assert np.mean(s) == pytest.approx(0.7, abs=1e-15) and all(np.diff(s) >= -1e-15)
    free = atp_dlp.allocate(U, 0.7, bmax / 2, 0.1, monotone=False)
    assert np.mean(free) == pytest.approx(0.7, abs=1e-15) and any(np.diff(free) < 0)


def test_isotonic_pools_violators_and_keeps_the_sum():
    assert atp_dlp.isotonic([1, 3, 2, 4, 0]) == pytest.approx([1, 2.25, 2.25, 2.25, 2.25])
    assert atp_dlp.isotonic([0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]


# ---------------------------------------------------------------- the whole path on tiny models


@pytest.mark.parametrize("alloc,extra", [("dlp", {}), ("lsa", {"lsa_block": 16}), ("alphapruning", {}),
                                         ("alphapruning", {"alpha_mapping": "layer_wise"}), ("atp_dlp", {})])
def test_allocators_on_a_tiny_model(alloc, extra):
    model = make_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, allocation=alloc, **extra)
    rates, info = resolve_allocation(model, cfg, ids, progress=False)
    assert np.mean(info["rates"]) == pytest.approx(0.6, abs=1e-9) and all(0 <= r < 1 for r in info["rates"])
    assert len(set(np.round(info["rates"], 9))) > 1


@pytest.mark.parametrize("flat,msg", [({"allocation": "dlp", "dlp_alpha": 0.5}, "DLP α must be in"),
                                      ({"allocation": "dlp", "dlp_score": "max"}, "--dlp_score"),
                                      ({"allocation": "alphapruning", "alpha_epsilon": 1.0}, "--alpha_epsilon"),
                                      ({"allocation": "lsa", "lsa_resp": 0.0}, "--lsa_resp"),
                                      ({"allocation": "lsa", "lsa_lambda": -0.1}, "--lsa_lambda"),
                                      ({"allocation": "atp_dlp", "atp_dlp_alpha": -1.0}, "--atp_dlp_alpha")])
def test_bad_settings_are_one_line_usage_errors(flat, msg):
    with pytest.raises(UsageError, match=msg):
        PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.7, **flat).validate()


def test_alphapruning_per_linear_rates_reach_the_saved_modules(tmp_path, tokenizer, calib_txt):
    from transformers import AutoModelForCausalLM

    from sparsellm.cli import main

    src = tmp_path / "model"
    make_model("llama", num_hidden_layers=3, hidden_size=64, intermediate_size=128).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    assert main(["--quiet", "prune", "--model", str(src), "--prune_method", "wanda", "--sparsity_ratio", "0.6",
                 "--allocation", "alphapruning", "--alpha_mapping", "layer_wise", "--alpha_epsilon", "0.5",
                 "--calib_dataset", str(calib_txt), "--nsamples", "2", "--seqlen", "16", "--eval", "none",
                 "--out", str(out)]) == 0
    layer_rates = json.loads((out / "report.json").read_text())["allocation"]["layer_rates"]
    pruned = AutoModelForCausalLM.from_pretrained(out)
    seen = set()
    for i, block in enumerate(pruned.model.layers):
        for name, rate in layer_rates[i].items():
            W = block.get_submodule(name).weight
            per_row = int(W.shape[1] * rate)  # Wanda zeroes floor(d_in · s) weights in every row
            assert (W == 0).sum(1).tolist() == [per_row] * W.shape[0], (i, name, rate)
            seen.add(round(rate, 6))
    assert len(seen) > 5  # the linears really got different rates


# ---------------------------------------------------------------- ATP + DLP's joint search


def test_fibonacci_trials_is_the_most_the_golden_search_scores():
    from sparsellm.allocate.atp_search import fibonacci_search, fibonacci_trials

    for n in range(1, 40):
        worst = max(len(fibonacci_search(lambda i, s=s: float((i * s) % 7), n)[1]) for s in range(1, 6))
        assert worst <= fibonacci_trials(n)
    assert [fibonacci_trials(n) for n in (1, 6, 11, 200)] == [1, 4, 5, 11]


def test_joint_search_stays_within_atps_budget_and_restores_the_model(tokenizer):
    import copy

    from sparsellm.allocate.atp_search import beta_grid, fibonacci_trials, search_joint
    from sparsellm.pipeline import prune

    model = make_model("llama", num_hidden_layers=6, max_position_embeddings=256)
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    scores = dlp.block_scores(model, ids, progress=False)
    rep = search_joint(model, tokenizer, ids, "wanda", 0.6, scores, step=0.02, objective="wikitext2",
                       objective_windows=1, objective_seqlen=32, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    n = len(beta_grid(6, 0.6, 0.02))
    assert len(rep["trials"]) <= fibonacci_trials(n) == rep["budget"]
    assert {t["alpha"] for t in rep["trials"]} >= {0.0, 0.15}  # both stages ran
    best = min(rep["trials"], key=lambda t: t["objective"])
    assert (rep["best_beta"], rep["best_alpha"]) == (best["beta"], best["alpha"])
    for t in rep["trials"]:
        assert t["rates"] == pytest.approx(atp_dlp.allocate(scores, 0.6, t["beta"], t["alpha"]), abs=1e-12)
    # the best trial's objective is an independent prune of a fresh copy at those rates, scored the same way
    m = copy.deepcopy(model)
    cfg = PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, allocation="atp_dlp",
                                atp_dlp_beta=best["beta"], atp_dlp_alpha=best["alpha"])
    prune(m, tokenizer, cfg, calib_ids=ids, progress=False)
    from sparsellm.evaluate import perplexity

    assert perplexity(m, tokenizer, "wikitext2", 32, 1, progress=False)["ppl"] == pytest.approx(best["objective"],
                                                                                                 rel=1e-4)


# ---------------------------------------------------------------- bench/layerwise_bench.py rows


def _bench():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("layerwise_bench",
                                                  Path(__file__).resolve().parents[1] / "bench/layerwise_bench.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    return lb


@pytest.mark.parametrize("alloc", ["dlp", "alphapruning", "lsa", "atp_dlp"])
def test_bench_rows_of_the_new_allocators(alloc, tmp_path, monkeypatch):
    import types

    lb = _bench()
    assert alloc in lb.ALLOCATIONS
    cmds = []

    def fake(cmd, check, cwd):
        cmds.append(cmd)
        save = tmp_path / alloc
        save.mkdir()
        rep = {"eval": {"wikitext2_ppl@2048": {"ppl": 9.0, "metric": "wikitext2_ppl@2048", "windows": 2}},
               "allocation": {"rates": [0.6, 0.8], "seconds": 3.5, **({"layer_rates": [{"a": 0.6}, {"a": 0.8}]}
                                                                        if alloc == "alphapruning" else {})},
               "prune": {"prune_seconds": 1.0, "options": {"batch_size": 4}, "measured": {"sparsity": 0.7},
                         "blocks": []}, "peak_rss_mib": 1.0}
        if alloc == "atp_dlp":
            rep["search"] = {"best_beta": 0.01, "beta_max": 0.02, "search_seconds": 40.0, "one_prune_seconds": 5.0,
                             "objective": {}, "best_alpha": 0.075, "budget": 4,
                             "trials": [{"beta": 0.01, "alpha": 0.075, "objective": 9.0, "seconds": 9.0}]}
        (save / "report.json").write_text(json.dumps(rep))

    monkeypatch.setattr(lb.subprocess, "run", fake)
    args = types.SimpleNamespace(model="m", method="wanda", sparsity=0.7, nsamples=2, seqlen=16, batch_size=None,
                                 eval_windows=2, atp_step=0.004, objective_windows=1)
    row = lb.run(args, alloc, tmp_path)
    assert ("--search" in cmds[0]) == (alloc == "atp_dlp") and row["allocation_seconds"] == 3.5
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"method": "wanda", "sparsity": 0.7, "runs": [row]}))
    line = lb.table([str(f)]).splitlines()[-1]
    assert f"| {43.5 if alloc == 'atp_dlp' else 3.5:.1f} |" in line  # the pre-pass (+ search) seconds
    if alloc == "atp_dlp":
        assert row["best_alpha"] == 0.075 and "α 0.075" in line
    if alloc == "alphapruning":
        with pytest.raises(SystemExit, match="per-linear"):
            lb.full_eval(args, row, tmp_path)


def test_cli_allocate_search_atp_dlp_records_beta_and_alpha(tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    save = tmp_path / "rep"
    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--allocation", "atp_dlp", "--search", "--atp_step", "0.2",
                 "--sparsity_ratio", "0.5", "--objective", "wikitext2", "--objective_windows", "1",
                 "--objective_seqlen", "32", "--eval", "none", "--save", str(save)]) == 0
    rep = json.loads((save / "report.json").read_text())
    s, a = rep["search"], rep["allocation"]
    assert (a["atp_dlp_beta"], a["atp_dlp_alpha"]) == (s["best_beta"], s["best_alpha"])
    assert a["rates"] == pytest.approx(s["best_rates"], abs=1e-12)
    assert json.loads((save / "rates.json").read_text()) == pytest.approx(a["rates"], abs=1e-12)
    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--allocation", "atp_dlp", "--search",
                 "--atp_dlp_beta", "0.1", "--eval", "none", "--save", str(tmp_path / "x")]) == 2


def test_alphapruning_spectra_are_computed_once_per_run(tmp_path, saved_model_dir, calib_txt, monkeypatch):
    """needs="weights": no early check before calibrating, so the run's allocation seconds are the spectra's."""
    from sparsellm.cli import main

    calls = []
    real = alphapruning.esd
    monkeypatch.setattr(alphapruning, "esd", lambda w: calls.append(1) or real(w))
    assert main(["--quiet", "allocate", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--allocation", "alphapruning", "--eval", "none",
                 "--save", str(tmp_path / "s")]) == 0
    assert len(calls) == 14  # 7 linears × 2 blocks, once
