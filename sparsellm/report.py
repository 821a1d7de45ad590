"""Human-readable run reports: a short markdown summary and a per-block table."""

from __future__ import annotations

import math


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def count(n, noun: str) -> str:
    """ "1 window", "16 windows"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def summary_table(run: dict) -> str:
    """Dense-vs-sparse table (one row per evaluated metric) plus sparsity and timing lines, whether the
    input was already sparse, and the run's warnings; for a plain evaluation, one ppl column."""
    dense, sparse = dict(run.get("eval_dense", {})), dict(run.get("eval", {}))
    zs_dense, zs = dense.pop("zeroshot", None), sparse.pop("zeroshot", None)
    if "prune" not in run:
        lines = []
        if sparse:
            lines = ["| metric | windows | tokens | ppl |", "|---|---|---|---|"]
            lines += [f"| {k} | {r['windows']} | {r['tokens']} | {r['ppl']:.3f} |" for k, r in sparse.items()]
        lines += source_lines(sparse)
        if zs:
            lines += ([""] if lines else []) + zeroshot_table(None, zs, label="model")
        return "\n".join(lines)
    lines = []
    if dense or sparse:
        lines = ["| metric | windows | dense | sparse |", "|---|---|---|---|"]
    for key in dict.fromkeys([*dense, *sparse]):
        d, s = dense.get(key), sparse.get(key)
        windows = (s or d)["windows"]
        lines.append(f"| {key} | {windows} | {fmt(d and d['ppl'])} | {fmt(s and s['ppl'])} |")
    lines += source_lines({**dense, **sparse})
    if zs or zs_dense:
        lines += ([""] if lines else []) + zeroshot_table(zs_dense, zs)
    p = run["prune"]
    m, c = p["measured"], p["calibration"]
    calib = (f"calibration {c['dataset']}: {c['nsamples']} × {c['seqlen']} tokens, seed {c['seed']}"
             if c.get("used", True) else "no calibration data (magnitude)")
    lines += [
        "",
        f"method **{p['method']}**, {p['sparsity_type']}, target {p['target_sparsity']:.4f}, "
        f"measured {m['sparsity']:.4f} ({m['zeros']:,} zeros / {m['params']:,} block-linear weights)",
        f"{calib}; dtype {p['dtype']}; engine {p.get('options', {}).get('engine', 'block')}",
        f"pruning {p['prune_seconds']:.1f} s, peak RSS {p['peak_rss_mib']:.0f} MiB, {p['threads']} threads",
    ]
    if p.get("input_already_sparse"):
        n = p["input"].get("refilled", 0)
        lines.append(f"the input was already sparse: {p['input']['sparsity']:.4f} ({p['input']['zeros']:,} zeros); "
                     + ("all of them were kept" if not n else f"{n:,} of them are non-zero now (linears with under "
                        "1% zeros, which SparseGPT prunes as dense)"))
    return "\n".join(lines + warning_lines(run))


def warning_lines(run: dict) -> list[str]:
    """The run's warnings (`checks`), one line each, after a blank line; none: no lines."""
    return ["", *(f"**warning**: {w}" for w in run.get("warnings") or [])] if run.get("warnings") else []


def source_lines(metrics: dict) -> list[str]:
    """One line per perplexity result that names its data: dataset and split, windows × seqlen, the bundled
    file with the start of its SHA-256, and the start of the scored tokens' SHA-256."""
    lines = []
    for key, r in metrics.items():
        if key != "zeroshot" and r.get("split"):
            lines.append(f"{key}: {r['dataset']} {r['split']} split, {count(r['windows'], 'window')} of {r['seqlen']} tokens "
                         f"from {r['source']} (SHA-256 {r['source_sha256'][:12]}…), scored tokens SHA-256 "
                         f"{r['tokens_sha256'][:12]}…")
    return [""] + lines if lines else []


def acc_text(value, se) -> str:
    """An accuracy with its standard error, "0.6500 ± 0.0340" (no ± where it is unknown)."""
    return fmt(value, ".4f") + ("" if se is None else f" ± {se:.4f}")


def zeroshot_table(dense: dict | None, sparse: dict | None, label: str = "sparse") -> list[str]:
    """Zero-shot acc ± its standard error (acc_norm) per task and the mean acc, dense and/or `label`
    columns, then the settings (lm-eval version, limit, dtype, device) and any warning."""
    cols = [(n, r) for n, r in (("dense", dense), (label, sparse)) if r]
    lines = ["| task | n | " + " | ".join(f"{n} acc ± s.e. (acc_norm)" for n, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    first = cols[0][1]
    for task in first["tasks"]:
        cells = []
        for _, r in cols:
            t = r["tasks"].get(task, {})
            cells.append(f"{acc_text(t.get('acc'), t.get('acc_stderr'))} ({fmt(t.get('acc_norm'), '.4f')})")
        lines.append(f"| {task} | {first['tasks'][task]['n']} | " + " | ".join(cells) + " |")
    lines.append("| **mean acc** | | " + " | ".join(f"**{acc_text(r['mean_acc'], r.get('mean_acc_stderr'))}**"
                                                      for _, r in cols) + " |")
    st = first["settings"]
    where = f", {st['dtype']} on {st['device']}" if st.get("dtype") else ""
    lines.append(f"\nzero-shot: lm-eval {st['lm_eval']}, limit {st['limit']}, {st['num_fewshot']}-shot{where}")
    lines += [f"warning: {w}" for _, r in cols for w in r.get("warnings", [])]
    return lines


def block_table(prune_report: dict) -> str:
    """One row per decoder block: target and measured sparsity, relative reconstruction error, seconds."""
    lines = ["| block | target | measured | local rel. error | cumulative rel. error | seconds |",
             "|---|---|---|---|---|---|"]
    for b in prune_report["blocks"]:
        lines.append(f"| {b['block']} | {b['target']:.4f} | {b['measured']:.4f} | {fmt(b['rel_error'], '.3e')} "
                     f"| {fmt(b.get('cum_error'), '.3e')} | {b['seconds']:.2f} |")
    if all(b.get("cum_error") is None for b in prune_report["blocks"]):
        lines.append("\nThe cumulative error was off: `--diag_nsamples N` runs N windows through the dense blocks too.")
    return "\n".join(lines)


ALLOCATION_SETTINGS = {"atp_beta": "β", "owl_m": "M", "owl_lambda": "λ", "owl_granularity": "granularity",
                       "rmi_nsamples": "windows", "rmi_beta": "β", "rmi_delta": "δ", "dlp_alpha": "α",
                       "dlp_score": "score", "alpha_epsilon": "ε", "alpha_mapping": "mapping", "lsa_lambda": "λ",
                       "atp_dlp_beta": "β", "atp_dlp_alpha": "α"}


def allocation_name(alloc: dict) -> str:
    """The allocation and its settings in one phrase: "allocation **atp** (β = 0.0100)"."""
    settings = ", ".join(f"{sym} = {alloc[k]:.4g}" if isinstance(alloc[k], float) else f"{sym} = {alloc[k]}"
                         for k, sym in ALLOCATION_SETTINGS.items() if k in alloc)
    return f"allocation **{alloc['name']}**{' (' + settings + ')' if settings else ''}"


def allocation_lines(alloc: dict) -> list[str]:
    """The allocation in words: its name, settings, time and the per-block rates."""
    return [f"{allocation_name(alloc)}, {alloc.get('seconds', 0.0):.1f} s", "",
            "rates: " + " ".join(f"{r:.4f}" for r in alloc["rates"])]


def search_line(search: dict) -> str:
    """The ATP search on one line for the terminal: the chosen β, then every trial's β and objective."""
    o, d = search["objective"], _beta_decimals(search)
    return (f"ATP search: β = {search['best_beta']:.{d}f} chosen (β_max {search['beta_max']:.{d}f}); {o['metric']} on "
            f"{count(o['windows'], 'window')}"
            f"{' (test-set selection)' if o['test_set_selection'] else ''}: "
            + ", ".join(f"{t['beta']:.{d}f}{_alpha(t)}: {t['objective']:.6g}" for t in search["trials"]))


def _alpha(trial: dict) -> str:
    """ATP+DLP's α of a joint-search trial, "" for ATP's own trials."""
    return f" α {trial['alpha']:.3f}" if "alpha" in trial else ""


def _beta_decimals(search: dict) -> int:
    """Decimals that keep every grid point's β distinct: 4 for steps >= 1e-4, more for finer grids."""
    step = search.get("step") or 1e-4
    return max(4, 1 - math.floor(math.log10(step)))


def _of_grid(search: dict) -> str:
    """How the grid was searched, e.g. " (golden search, of 11 grid points)"; "" for older reports."""
    if "strategy" not in search:
        return ""
    return f" ({search['strategy']} search, of {search['grid_size']} grid points)"


def search_table(search: dict) -> str:
    """One row per ATP trial: β, the objective, seconds; the chosen β is marked."""
    o = search["objective"]
    flag = " **(test-set selection: scored on the WikiText-2 test itself)**" if o["test_set_selection"] else ""
    if o.get("also_evaluated") and not o["test_set_selection"]:
        flag += f" **(the {o['dataset']} evaluation below includes these windows: not held out from it)**"
    lines = [f"ATP β search: objective {o['metric']} on {count(o['windows'], 'window')}{flag}; "
             f"{len(search['trials'])} trials{_of_grid(search)} in {search['search_seconds']:.1f} s "
             + (f"(one prune: {search['one_prune_seconds']:.1f} s)" if search.get("one_prune_seconds") is not None
                else f"(trials score masks from one dense pass of {search.get('setup_seconds', 0):.1f} s)"), "",
             "| β | objective | prune s | trial s |", "|---|---|---|---|"]
    for t in search["trials"]:
        mark = " ←" if t["beta"] == search["best_beta"] and t.get("alpha") == search.get("best_alpha") else ""
        lines.append(f"| {t['beta']:.{_beta_decimals(search)}f}{_alpha(t)}{mark} | {t['objective']:.3f} | {t['prune_seconds']:.1f} | {t['seconds']:.1f} |")
    return "\n".join(lines)


def terminal(run: dict) -> str:
    """What a run prints when it ends: the allocation with its settings (after a prune), for `allocate` the
    ATP search line and the rates; then the summary."""
    lines = []
    alloc = run.get("allocation") or (run.get("prune") or {}).get("allocation")
    if alloc and run.get("prune"):  # after a prune: which allocation, with its β, λ or δ
        lines.append(allocation_name(alloc))
    if run.get("command") == "allocate":
        if run.get("search"):
            lines.append(search_line(run["search"]))
        lines.append("rates: " + " ".join(f"{r:.4f}" for r in run["allocation"]["rates"]))
    return "\n".join(lines + [summary_table(run)])


def ratio_text(ratio: float, spread: dict | None = None) -> str:
    """A speed ratio with the spread of its per-repeat ratios (speed.ratio_spread): "1.31× (1.22–1.40)", or
    "1.02× (0.41–2.51, within noise)" when the spread contains 1.0, which is then no measured difference."""
    if not spread:
        return f"{ratio:.2f}×"
    if spread["repeats"] < 2:
        return f"{ratio:.2f}× (1 repeat: noise not measured)"
    return (f"{ratio:.2f}× ({spread['min']:.2f}–{spread['max']:.2f}"
            + (", within noise)" if spread["within_noise"] else ")"))


def speed_table(res: dict) -> str:
    """`sparsellm bench`'s table: tokens/s per run and measurement with the ratio to the baseline (dense fp32;
    on a GPU dense bf16) and the spread of its per-repeat ratios, the ratios to dense bf16 and, with
    DeepSparse, its own ratios and its logit check."""
    keys = list(next(iter(res["results"].values())))
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for n, r in res["results"].items():
        ratio, spread = res["ratios"].get(n, {}), res.get("ratio_spread", {}).get(n, {})
        lines.append(f"| {n} | " + " | ".join(f"{r[k]:.1f} tok/s" + (f", {ratio_text(ratio[k], spread.get(k))}"
                                                                     if ratio else "") for k in keys) + " |")
    for n, r in res.get("ratios_vs_dense_bf16", {}).items():
        if n != "dense fp32":
            spread = res.get("ratio_spread_vs_dense_bf16", {}).get(n, {})
            lines.append(f"{n} vs dense bf16: " + ", ".join(f"{k} {ratio_text(v, spread.get(k))}" for k, v in r.items()))
    if res.get("ratio_spread"):
        lines.append("(ratio, then the range of its per-repeat ratios; \"within noise\": the range contains 1.0×, "
                     "so no difference was measured)")
    if res.get("deepsparse"):
        ds = res["deepsparse"]
        lines.append("DeepSparse model vs DeepSparse dense: " + ", ".join(
            f"{k} {v:.2f}×" for k, v in ds["ratios"]["model"].items()))
        lines.append("DeepSparse vs PyTorch logits on a fixed prompt: " + ", ".join(
            f"{n} max |Δ| {c['max_abs_logit_diff']:.2e}, greedy agreement {c['greedy_agreement']:.2f}"
            for n, c in ds["check"].items()))
    return "\n".join(lines)


def search_markdown(run: dict) -> str:
    """report.md of a Self-Pruner search run."""
    r = run["search"]
    ops = r.get("operators") or {}
    lines = [f"# sparsellm search: {run['model']}", "",
             f"backend **{r['backend']}**, metric {r['metric']}, GQA mode {r['gqa']}, mean rate {r['target_rate']:g} "
             f"(each block in [0, {r['max_rate']:g}])",
             f"parameters {r['params_dense']:,} → {r['params_pruned']:,} ({r['params_pruned'] / r['params_dense']:.3f} of dense)"
             + (f", weights on disk {r['weights_mib']:.1f} MiB" if "weights_mib" in r else ""),
             f"{r['evals']:g} fitness evaluations over {r['generations']} generations in {r['search_seconds']:.1f} s "
             + (f"({r['new_candidates']} of {r['proposed']} proposed candidates were new) " if r.get("proposed") else "")
             + f"(importance {r['importance_seconds']:.1f} s); best fitness (c4 ppl@{r['fitness']['seqlen']}, "
             f"{count(r['fitness']['windows'], 'window')}) {r['best_fitness']:.4f}"]
    if "calls" in ops:
        steps = ops.get("steps") or {}
        lines.append(f"LLM calls {ops.get('calls', 0)}, invalid replies {ops.get('invalid_replies', 0)}, "
                     f"GA fallbacks {ops.get('fallbacks', {})}"
                     + (f"; operator steps: valid first try {steps.get('first_try', 0)}, after retries "
                        f"{steps.get('retried', 0)}, fell back {steps.get('fell_back', 0)}; clamped rates "
                        f"{ops.get('clamped', 0)}" if steps else "")
                     + (f"; backend {ops['backend']}" if ops.get("backend") else ""))
    lines += ["", "rates: " + " ".join(f"{x:.3f}" for x in r["best_rates"])]
    for k, f in enumerate(r["final"]):
        ev = " ".join(f"{m} {v['ppl']:.3f}" for m, v in (f.get("eval") or {}).items())
        lines.append(f"candidate {k}: fitness {f['fitness']:.4f} {ev}")
    for m, v in run.get("eval", {}).items():
        if m != "zeroshot":
            lines.append(f"{m}: {v['ppl']:.3f} ({count(v['windows'], 'window')})")
        else:
            lines.append(f"zero-shot mean acc {v['mean_acc']:.4f}")
    if run.get("speed"):
        spread = run["speed"].get("ratio_spread", {}).get("model fp32", {})
        lines.append("speed vs dense (fp32): " + ", ".join(f"{k} {ratio_text(v, spread.get(k))}"
                                                           for k, v in run["speed"]["ratios"]["model fp32"].items()))
    return "\n".join(lines) + "\n"


def markdown(run: dict) -> str:
    out = [f"# sparsellm run: {run.get('model', '')}", "", summary_table(run)]
    alloc = run.get("allocation") or (run.get("prune") or {}).get("allocation")
    if alloc:
        out += ["", *allocation_lines(alloc)]
    if run.get("search"):
        out += ["", search_table(run["search"])]
    if run.get("finetune"):
        out += ["", "## Fine-tuning", "", finetune_table(run["finetune"])]
    if run.get("prune"):
        out += ["", "## Per block", "", block_table(run["prune"])]
    return "\n".join(out) + "\n"


def finetune_table(ft: dict) -> str:
    """One row per fine-tuning step (LoSA) or one row (baselines): target and measured sparsity after the
    merge, mean rank, training loss first → last, tokens, seconds and the per-step perplexity."""
    lines = [f"method **{ft['method']}**: {ft['examples']} examples, {ft['tokens_budget']:,} loss tokens, "
             f"{ft['seconds']:.1f} s in all, peak RSS {ft['peak_rss_mib']:.0f} MiB; measured sparsity after the "
             f"merge {ft['measured']['sparsity']:.4f}", "",
             "| step | target | measured | mean rank | train loss first → last | tokens | train s | ppl (windows) |",
             "|---|---|---|---|---|---|---|---|"]
    for st in ft["steps"]:
        tr = st.get("train") or ft.get("train")
        loss = f"{tr['losses'][0]:.4f} → {tr['losses'][-1]:.4f}" if tr and tr["losses"] else "—"
        ppl = st.get("ppl")
        ppl = "—" if not ppl else f"{ppl['ppl']:.3f} ({ppl['windows']})"
        lines.append(f"| {st['step']} | {st['target']:.4f} | {fmt(st.get('measured'), '.4f')} | "
                     f"{fmt(st.get('mean_rank'), '.1f')} | {loss} | {tr['tokens'] if tr else 0:,} | "
                     f"{fmt(tr and tr['seconds'], '.1f')} | "
                     f"{ppl} |")
    if ft.get("ranks"):
        lines += ["", "ranks per block: " + " ".join(str(r) for r in ft["ranks"])]
    if ft.get("merge"):
        mg = ft["merge"]
        lines += ["", f"merged vs adapted model: max |logit difference| {mg['max_abs_logit_diff']:.3g} on "
                      f"{mg['tokens']} calibration tokens ({mg['dtype']})"]
    if (ft.get("input") or {}).get("kept"):
        i = ft["input"]
        lines += ["", f"input already pruned ({i['method']}, {i['allocation']['name']} allocation, target "
                      f"{i['target']:.4f}, from {'its sidecar' if i['source'] == 'sidecar' else 'its weights'}): "
                      "its masks and per-block rates were kept, not pruned again"]
    return "\n".join(lines)


def finetune_comparison(runs: dict) -> str:
    """Methods side by side: perplexity per metric, measured sparsity of the merged model, the merge's max
    |logit difference| against the adapted model, fine-tuning tokens, wall time and peak memory."""
    metrics = list(dict.fromkeys(k for r in runs.values() for k in r.get("eval", {}) if k != "zeroshot"))
    head = ["method", *metrics, "zero-shot mean acc", "measured sparsity", "merge max |Δlogit|", "FT tokens",
            "seconds", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in runs.items():
        ft, ev = r["finetune"], r.get("eval", {})
        tokens = sum((st.get("train") or {}).get("tokens", 0) for st in ft["steps"]) + (ft.get("train") or {}).get("tokens", 0)
        zs = ev.get("zeroshot")
        lines.append("| " + " | ".join([m, *[fmt(ev.get(k, {}).get("ppl")) for k in metrics],
                                        fmt(zs and zs["mean_acc"], ".4f"), f"{ft['measured']['sparsity']:.4f}",
                                        fmt((ft.get("merge") or {}).get("max_abs_logit_diff"), ".3g"),
                                        f"{tokens:,}", f"{ft['seconds']:.1f}", f"{ft['peak_rss_mib']:.0f}"]) + " |")
    return "\n".join(lines)
