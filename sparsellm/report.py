"""Human-readable run reports: a short markdown summary and a per-block table."""

from __future__ import annotations

import math


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def summary_table(run: dict) -> str:
    """Dense-vs-sparse table (one row per evaluated metric) plus sparsity and timing lines; for a plain
    evaluation, one ppl column."""
    dense, sparse = dict(run.get("eval_dense", {})), dict(run.get("eval", {}))
    zs_dense, zs = dense.pop("zeroshot", None), sparse.pop("zeroshot", None)
    if "prune" not in run:
        lines = []
        if sparse:
            lines = ["| metric | windows | tokens | ppl |", "|---|---|---|---|"]
            lines += [f"| {k} | {r['windows']} | {r['tokens']} | {r['ppl']:.3f} |" for k, r in sparse.items()]
        if zs:
            lines += ([""] if lines else []) + zeroshot_table(None, zs, label="model")
        return "\n".join(lines)
    lines = []
    if dense or sparse:
        lines = ["| metric | windows | dense | sparse |", "|---|---|---|---|"]
    for key in dict.fromkeys([*dense, *sparse]):
        d, s = dense.get(key), sparse.get(key)
        windows = (s or d)["windows"]
        lines.append(f"| {key} | {windows} | {_fmt(d and d['ppl'])} | {_fmt(s and s['ppl'])} |")
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
        f"{calib}; dtype {p['dtype']}",
        f"pruning {p['prune_seconds']:.1f} s, peak RSS {p['peak_rss_mib']:.0f} MiB, {p['threads']} threads",
    ]
    return "\n".join(lines)


def zeroshot_table(dense: dict | None, sparse: dict | None, label: str = "sparse") -> list[str]:
    """Zero-shot acc (acc_norm) per task and the mean acc, dense and/or `label` columns."""
    cols = [(n, r) for n, r in (("dense", dense), (label, sparse)) if r]
    lines = ["| task | n | " + " | ".join(f"{n} acc (acc_norm)" for n, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    first = cols[0][1]
    for task in first["tasks"]:
        cells = []
        for _, r in cols:
            t = r["tasks"].get(task, {})
            cells.append(f"{_fmt(t.get('acc'), '.4f')} ({_fmt(t.get('acc_norm'), '.4f')})")
        lines.append(f"| {task} | {first['tasks'][task]['n']} | " + " | ".join(cells) + " |")
    lines.append("| **mean acc** | | " + " | ".join(f"**{r['mean_acc']:.4f}**" for _, r in cols) + " |")
    lines.append(f"\nzero-shot: lm-eval {first['settings']['lm_eval']}, limit {first['settings']['limit']}, "
                 f"{first['settings']['num_fewshot']}-shot")
    return lines


def block_table(prune_report: dict) -> str:
    """One row per decoder block: target and measured sparsity, relative reconstruction error, seconds."""
    lines = ["| block | target | measured | local rel. error | cumulative rel. error | seconds |",
             "|---|---|---|---|---|---|"]
    for b in prune_report["blocks"]:
        lines.append(f"| {b['block']} | {b['target']:.4f} | {b['measured']:.4f} | {_fmt(b['rel_error'], '.3e')} "
                     f"| {_fmt(b.get('cum_error'), '.3e')} | {b['seconds']:.2f} |")
    return "\n".join(lines)


def allocation_lines(alloc: dict) -> list[str]:
    """The allocation in words: its name, settings, time and the per-block rates."""
    keys = [k for k in ("atp_beta", "owl_m", "owl_lambda", "owl_granularity", "rmi_nsamples", "rmi_beta",
                        "rmi_delta") if k in alloc]
    settings = ", ".join(f"{k} {alloc[k]}" for k in keys)
    return [f"allocation **{alloc['name']}**{' (' + settings + ')' if settings else ''}, "
            f"{alloc.get('seconds', 0.0):.1f} s", "",
            "rates: " + " ".join(f"{r:.4f}" for r in alloc["rates"])]


def search_line(search: dict) -> str:
    """The ATP search on one line for the terminal: the chosen β, then every trial's β and objective."""
    o, d = search["objective"], _beta_decimals(search)
    return (f"ATP search: β = {search['best_beta']:.{d}f} chosen (β_max {search['beta_max']:.{d}f}); {o['metric']} on "
            f"{o['windows']} window{'s' * (o['windows'] != 1)}"
            f"{' (test-set selection)' if o['test_set_selection'] else ''}: "
            + ", ".join(f"{t['beta']:.{d}f}: {t['objective']:.6g}" for t in search["trials"]))


def _beta_decimals(search: dict) -> int:
    """Decimals that keep every grid point's β distinct: 4 for steps >= 1e-4, more for finer grids."""
    step = search.get("step") or 1e-4
    return max(4, 1 - math.floor(math.log10(step)))


def search_table(search: dict) -> str:
    """One row per ATP trial: β, the objective, seconds; the chosen β is marked."""
    o = search["objective"]
    flag = " **(test-set selection: scored on the WikiText-2 test itself)**" if o["test_set_selection"] else ""
    if o.get("also_evaluated") and not o["test_set_selection"]:
        flag += f" **(the {o['dataset']} evaluation below includes these windows: not held out from it)**"
    lines = [f"ATP β search: objective {o['metric']} on {o['windows']} windows{flag}; "
             f"{len(search['trials'])} trials in {search['search_seconds']:.1f} s "
             f"(one prune: {search['one_prune_seconds']:.1f} s)", "",
             "| β | objective | prune s | trial s |", "|---|---|---|---|"]
    for t in search["trials"]:
        mark = " ←" if t["beta"] == search["best_beta"] else ""
        lines.append(f"| {t['beta']:.{_beta_decimals(search)}f}{mark} | {t['objective']:.3f} | {t['prune_seconds']:.1f} | {t['seconds']:.1f} |")
    return "\n".join(lines)


def terminal(run: dict) -> str:
    """What a run prints when it ends: for `allocate`, the ATP search line and the rates; then the summary."""
    lines = []
    if run.get("command") == "allocate":
        if run.get("search"):
            lines.append(search_line(run["search"]))
        lines.append("rates: " + " ".join(f"{r:.4f}" for r in run["allocation"]["rates"]))
    return "\n".join(lines + [summary_table(run)])


def speed_table(res: dict) -> str:
    """`sparsellm bench`'s table: tokens/s per run and measurement with the ratio to dense fp32, the ratios
    to dense bf16 and, with DeepSparse, its own ratios and its logit check."""
    keys = list(res["results"]["dense fp32"])
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for n, r in res["results"].items():
        ratio = res["ratios"].get(n, {})
        lines.append(f"| {n} | " + " | ".join(f"{r[k]:.1f} tok/s" + (f" ({ratio[k]:.2f}×)" if ratio else "")
                                              for k in keys) + " |")
    for n, r in res.get("ratios_vs_dense_bf16", {}).items():
        if n != "dense fp32":
            lines.append(f"{n} vs dense bf16: " + ", ".join(f"{k} {v:.2f}×" for k, v in r.items()))
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
             f"{r['evals']} fitness evaluations over {r['generations']} generations in {r['search_seconds']:.1f} s "
             f"(importance {r['importance_seconds']:.1f} s); best fitness (c4 ppl@{r['fitness']['seqlen']}, "
             f"{r['fitness']['windows']} windows) {r['best_fitness']:.4f}"]
    if ops:
        lines.append(f"LLM calls {ops.get('calls', 0)}, invalid replies {ops.get('invalid_replies', 0)}, "
                     f"GA fallbacks {ops.get('fallbacks', {})}")
    lines += ["", "rates: " + " ".join(f"{x:.3f}" for x in r["best_rates"])]
    for k, f in enumerate(r["final"]):
        ev = " ".join(f"{m} {v['ppl']:.3f}" for m, v in (f.get("eval") or {}).items())
        lines.append(f"candidate {k}: fitness {f['fitness']:.4f} {ev}")
    for m, v in run.get("eval", {}).items():
        if m != "zeroshot":
            lines.append(f"{m}: {v['ppl']:.3f} ({v['windows']} windows)")
        else:
            lines.append(f"zero-shot mean acc {v['mean_acc']:.4f}")
    if run.get("speed"):
        lines.append("speed vs dense (fp32): " + ", ".join(f"{k} {v:.2f}×" for k, v in run["speed"]["ratios"]["model fp32"].items()))
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
        lines.append(f"| {st['step']} | {st['target']:.4f} | {_fmt(st.get('measured'), '.4f')} | "
                     f"{_fmt(st.get('mean_rank'), '.1f')} | {loss} | {tr['tokens'] if tr else 0:,} | "
                     f"{_fmt(tr and tr['seconds'], '.1f')} | "
                     f"{ppl} |")
    if ft.get("ranks"):
        lines += ["", "ranks per block: " + " ".join(str(r) for r in ft["ranks"])]
    return "\n".join(lines)


def finetune_comparison(runs: dict) -> str:
    """Methods side by side: perplexity per metric, measured sparsity of the merged model, fine-tuning
    tokens, wall time and peak memory."""
    metrics = list(dict.fromkeys(k for r in runs.values() for k in r.get("eval", {}) if k != "zeroshot"))
    head = ["method", *metrics, "zero-shot mean acc", "measured sparsity", "FT tokens", "seconds", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in runs.items():
        ft, ev = r["finetune"], r.get("eval", {})
        tokens = sum((st.get("train") or {}).get("tokens", 0) for st in ft["steps"]) + (ft.get("train") or {}).get("tokens", 0)
        zs = ev.get("zeroshot")
        lines.append("| " + " | ".join([m, *[_fmt(ev.get(k, {}).get("ppl")) for k in metrics],
                                        _fmt(zs and zs["mean_acc"], ".4f"), f"{ft['measured']['sparsity']:.4f}",
                                        f"{tokens:,}", f"{ft['seconds']:.1f}", f"{ft['peak_rss_mib']:.0f}"]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ `sparsellm report`: several runs side by side


def load_run(path) -> tuple[dict, "Path"]:
    """A run's report.json (given the file or its directory) and the directory. Raises UsageError."""
    import json
    from pathlib import Path

    from .errors import UsageError

    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    try:
        run = json.loads(f.read_text())
    except FileNotFoundError:
        raise UsageError(f"no report.json at {path}") from None
    except OSError as e:  # e.g. a directory named report.json
        raise UsageError(f"cannot read {f}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{f} is not valid JSON") from None
    if not isinstance(run, dict) or "command" not in run:
        raise UsageError(f"{f} is not a sparsellm run report")
    return run, f.parent


def run_row(run: dict, directory) -> dict:
    """One row of the cross-run table: model, method, allocation, target and measured sparsity, ppl per
    metric, zero-shot mean acc, speed ratios (fp32 model / fp32 dense baseline, from speed.json next to the
    report, if any; with DeepSparse, also the model in DeepSparse / PyTorch dense fp32), size on disk of
    the weights in the directory, non-zero block-linear weights."""
    import json

    p = run.get("prune") or {}
    cfg = run.get("config") or {}
    if run.get("command") == "search":  # structured: "measured" is the fraction of all parameters removed
        s = run["search"]
        p = {"method": f"{s['metric']} ({s['backend']} search)", "allocation": {"name": "searched", "rates": s["best_rates"]},
             "sparsity_type": "structured", "target_sparsity": s["target_rate"]}
        m = None
        extra_measured = 1 - s["params_pruned"] / s["params_dense"]
    else:
        extra_measured = None
    ev = run.get("eval", {})
    zs = ev.get("zeroshot")
    speed = {}
    if (directory / "speed.json").is_file():
        ratios = json.loads((directory / "speed.json").read_text()).get("ratios", {})
        speed = dict(ratios.get("model fp32", {}))
        # with --deepsparse: the pruned model in DeepSparse, against PyTorch dense fp32 of the same bench run
        speed.update({f"deepsparse {k}": v for k, v in ratios.get("deepsparse model", {}).items()})
    weights = [f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin")]
    m = p.get("measured")
    if extra_measured is not None:
        m = None
    return {
        "dir": str(directory), "model": run.get("model", ""),
        "method": p.get("method", cfg.get("prune_method", "dense" if run.get("command", "").startswith("eval") else "")),
        "allocation": (p.get("allocation") or run.get("allocation") or {}).get("name", ""),
        "sparsity_type": p.get("sparsity_type", cfg.get("sparsity_type", "")),
        "target": p.get("target_sparsity", cfg.get("sparsity_ratio", 0.0 if run.get("command", "").startswith("eval")
                                                   else None)),
        "measured": m["sparsity"] if m else extra_measured,
        "nonzeros": (m["params"] - m["zeros"]) if m else None,
        "ppl": {k: r["ppl"] for k, r in ev.items() if k != "zeroshot"},
        "zeroshot_mean_acc": zs["mean_acc"] if zs else None,
        "speed": speed,
        "size_mib": sum(f.stat().st_size for f in weights) / 2**20 if weights else None,
        "rates": (p.get("allocation") or run.get("allocation") or {}).get("rates"),
    }


def compare_runs(paths, out=None) -> str:
    """`sparsellm report`: the runs at `paths` (directories or report.json files) side by side. With `out`,
    also write report.md, ppl_vs_sparsity.png and rates.png there. Returns the markdown table. Raises
    UsageError for an unreadable run, or an `out` that is a file or one of the run directories."""
    from pathlib import Path

    from . import plots
    from .errors import UsageError
    from .outputs import check_output_dir, write_text_atomic

    if out is not None:  # before reading anything: an unusable --out is bad input, not an errno at the end
        check_output_dir(out, overwrite=True, inputs=[], replaces=False)
    rows = []
    for path in paths:
        run, directory = load_run(path)
        try:
            rows.append(run_row(run, directory))
        except (AttributeError, TypeError, KeyError, ValueError):
            raise UsageError(f"{path} is not a sparsellm run report (its sections are not the ones runs write)") from None
    table = runs_table(rows)
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out is a file: {out}")
        for path in paths:
            run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
            if run_dir.resolve() == out.resolve():
                raise UsageError(f"--out would write into a run directory given as input: {path}")
        write_text_atomic(out / "report.md", "# sparsellm runs\n\n" + table + "\n")
        metrics = list(dict.fromkeys(k for r in rows for k in r["ppl"]))
        if metrics:
            plots.ppl_vs_sparsity(rows, metrics[0], out / "ppl_vs_sparsity.png")
        if any(r["rates"] for r in rows):
            plots.block_rates(rows, out / "rates.png")
    return table


def runs_table(rows: list[dict]) -> str:
    """Markdown table with one row per run; one column per perplexity metric and per speed ratio seen."""
    metrics = list(dict.fromkeys(k for r in rows for k in r["ppl"]))
    speeds = list(dict.fromkeys(k for r in rows for k in r["speed"]))
    head = (["run", "method", "allocation", "type", "target", "measured", *metrics, "zero-shot mean acc",
             *[f"speed {s}" for s in speeds], "weights MiB", "non-zeros"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dir"], r["method"], r["allocation"], r["sparsity_type"], _fmt(r["target"], ".2f"),
                 _fmt(r["measured"], ".4f"), *[_fmt(r["ppl"].get(k), ".3f") for k in metrics],
                 _fmt(r["zeroshot_mean_acc"], ".4f"), *[_fmt(r["speed"].get(s), ".2f") + ("×" if s in r["speed"] else "") for s in speeds],
                 _fmt(r["size_mib"], ".1f"), "—" if r["nonzeros"] is None else f"{r['nonzeros']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
