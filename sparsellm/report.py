"""Human-readable run reports: a short markdown summary and a per-block table."""

from __future__ import annotations


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def summary_table(run: dict) -> str:
    """Dense-vs-sparse table (one row per evaluated metric) plus sparsity and timing lines; for a plain
    evaluation, one ppl column."""
    dense, sparse = run.get("eval_dense", {}), run.get("eval", {})
    if "prune" not in run:
        lines = ["| metric | windows | tokens | ppl |", "|---|---|---|---|"]
        lines += [f"| {k} | {r['windows']} | {r['tokens']} | {r['ppl']:.3f} |" for k, r in sparse.items()]
        return "\n".join(lines)
    lines = ["| metric | windows | dense | sparse |", "|---|---|---|---|"]
    for key in dict.fromkeys([*dense, *sparse]):
        d, s = dense.get(key), sparse.get(key)
        windows = (s or d)["windows"]
        lines.append(f"| {key} | {windows} | {_fmt(d and d['ppl'])} | {_fmt(s and s['ppl'])} |")
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


def search_table(search: dict) -> str:
    """One row per ATP trial: β, the objective, seconds; the chosen β is marked."""
    o = search["objective"]
    flag = " **(test-set selection: scored on the WikiText-2 test itself)**" if o["test_set_selection"] else ""
    lines = [f"ATP β search: objective {o['metric']} on {o['windows']} windows{flag}; "
             f"{len(search['trials'])} trials in {search['search_seconds']:.1f} s "
             f"(one prune: {search['one_prune_seconds']:.1f} s)", "",
             "| β | objective | prune s | trial s |", "|---|---|---|---|"]
    for t in search["trials"]:
        mark = " ←" if t["beta"] == search["best_beta"] else ""
        lines.append(f"| {t['beta']:.4f}{mark} | {t['objective']:.3f} | {t['prune_seconds']:.1f} | {t['seconds']:.1f} |")
    return "\n".join(lines)


def markdown(run: dict) -> str:
    out = [f"# sparsellm run: {run.get('model', '')}", "", summary_table(run)]
    alloc = run.get("allocation") or (run.get("prune") or {}).get("allocation")
    if alloc:
        out += ["", *allocation_lines(alloc)]
    if run.get("search"):
        out += ["", search_table(run["search"])]
    if run.get("prune"):
        out += ["", "## Per block", "", block_table(run["prune"])]
    return "\n".join(out) + "\n"
