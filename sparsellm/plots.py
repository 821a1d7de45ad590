"""PNG figures with matplotlib (Agg backend, no display): the per-block reconstruction error curves of
one or more runs on one figure (ATP's "reconstruction error explosion", §3.2, Fig. 1), and the objective
of an ATP β search."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .outputs import apply_umask


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Save atomically: a temporary file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        apply_umask(Path(tmp))  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        _pyplot().close(fig)
    return path


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def error_curves(runs: dict[str, list[dict]], path, title: str = "") -> Path:
    """Plot `rel_error` (local, dashed) and `cum_error` (cumulative, solid) against block index for each
    run. runs: {label: the `blocks` list of a prune report}. Log-scale y. Returns the path written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, blocks) in enumerate(runs.items()):
        color = f"C{k}"
        x = [b["block"] for b in blocks]
        cum = [b.get("cum_error") for b in blocks]
        loc = [b.get("rel_error") for b in blocks]
        if any(v is not None for v in cum):
            ax.plot(x, [float("nan") if v is None else v for v in cum], "-o", ms=3, color=color,
                    label=f"{label}: cumulative")
        if any(v is not None for v in loc):
            ax.plot(x, [float("nan") if v is None else v for v in loc], "--", color=color, alpha=0.7,
                    label=f"{label}: local")
    if any(v and v > 0 for blocks in runs.values() for b in blocks for v in (b.get("cum_error"), b.get("rel_error"))):
        ax.set_yscale("log")  # (all-zero errors, e.g. at sparsity 0, stay on a linear axis)
    _integer_x(ax)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error ‖Y − Ŷ‖ / ‖Y‖")
    ax.set_title(title or "reconstruction error per block")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def beta_search(search: dict, path) -> Path:
    """Plot the ATP objective against β, marking the best β. search: the report of atp_search.search."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    betas = [t["beta"] for t in search["trials"]]
    objs = [t["objective"] for t in search["trials"]]
    ax.plot(betas, objs, "-o", ms=4)
    ax.axvline(search["best_beta"], color="C3", ls=":", label=f"best β = {search['best_beta']:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("ATP common difference β")
    o = search["objective"]
    flag = " (TEST-SET SELECTION)" if o["test_set_selection"] else ""
    ax.set_ylabel(f"{o['metric']} on {o['windows']} window{'' if o['windows'] == 1 else 's'}{flag}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def ppl_vs_sparsity(rows: list[dict], metric: str, path) -> Path:
    """One line per (method, allocation, pattern): `metric` perplexity against measured sparsity (log y),
    the legend naming the pattern (2:4, unstructured, ...). rows: from compare.run_row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for r in rows:
        if metric in r["ppl"]:
            x = r["measured"] if r["measured"] is not None else (r["target"] or 0.0)
            label = " ".join(str(v) for v in (r["method"], r["allocation"]) if v)
            if r.get("sparsity_type"):
                label += f", {r['sparsity_type']}"
            groups.setdefault(label, []).append((x, r["ppl"][metric]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("measured sparsity of the block linears")
    ax.set_ylabel(metric)
    ax.set_title(f"perplexity ({metric}) against sparsity, {len(groups)} method{'s' * (len(groups) != 1)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def block_rates(rows: list[dict], path) -> Path:
    """Per-block sparsity of every run that has an allocation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.get("rates"):
            ax.plot(range(len(r["rates"])), r["rates"], "-", marker=".", label=f"{r['method']} {r['allocation']} "
                    f"({Path(r['dir']).name})")
    _integer_x(ax)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def search_progress(history: list[dict], path, title: str = "") -> Path:
    """Best and mean fitness of the population against the generation (Self-Pruner's search)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    g = [h["generation"] for h in history]
    ax.plot(g, [h["best"] for h in history], marker="o", label="best")
    ax.plot(g, [h["mean"] for h in history], marker=".", linestyle="--", label="population mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (held-out perplexity)")
    ax.set_title(title or "evolutionary search")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def structured_rates(rates: list[float], target: float, path, title: str = "") -> Path:
    """The best rate vector per decoder block, with the target mean."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(rates)), rates, color="tab:blue")
    ax.axhline(target, color="tab:red", linestyle="--", label=f"mean {target:g}")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("structured pruning rate")
    ax.set_title(title or "rates per block")
    _integer_x(ax)
    ax.legend()
    return _save(fig, path)


def plot_reports(reports, out, labels=None, title: str = "") -> Path:
    """`sparsellm plot-errors`: the per-block reconstruction errors of several prune reports (report.json
    files or their directories) on one PNG `out`; `labels`: one legend label per report (default: method,
    allocation and target; repeated labels get the folder name, then a number). Raises UsageError for a
    report without per-block errors, bad labels, or an `out` that is not a .png file or is an input."""
    import json

    from .errors import UsageError

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {out}")
    if out.is_dir():
        raise UsageError(f"--out is a directory: {out}")
    from .outputs import check_output_dir

    check_output_dir(out.parent, overwrite=True, inputs=[], replaces=False)  # a writable directory, or creatable
    if labels is not None and len(labels) != len(reports):
        raise UsageError(f"{len(labels)} labels for {len(reports)} reports")
    if labels is not None and len(set(labels)) != len(labels):
        raise UsageError("--labels must be distinct")
    runs = {}
    for k, path in enumerate(reports):
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        if p.resolve() == out.resolve():
            raise UsageError(f"--out would overwrite an input: {path}")
        pruned_nothing = False
        try:
            run = json.loads(p.read_text())
            pruned_nothing = isinstance(run, dict) and run.get("command") == "allocate" and "prune" not in run
            rep = run["prune"]
            blocks = rep["blocks"]
            if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("block"), int)
                                                       for b in blocks):
                raise TypeError
        except FileNotFoundError:
            raise UsageError(f"report not found: {path}") from None
        except OSError as e:  # e.g. a directory named report.json
            raise UsageError(f"cannot read {p}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{p} is not valid JSON") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if pruned_nothing:
                raise UsageError(f"{path} is a run that pruned nothing (allocate with --eval none and no "
                                 "--out writes only the rates), so it has no per-block errors to plot") from None
            raise UsageError(f"{path} is not a sparsellm prune report (no prune.blocks)") from None
        if not any(b.get("rel_error") is not None or b.get("cum_error") is not None for b in blocks):
            raise UsageError(f"{path} has no reconstruction errors (magnitude without --diag_nsamples?)")
        alloc = (rep.get("allocation") or {}).get("name", "")
        target = rep.get("target_sparsity")
        label = labels[k] if labels else " ".join(
            str(x) for x in (rep.get("method", ""), alloc, "" if target is None else f"{target:.2f}") if x != "")
        if label in runs:
            label = f"{label} ({p.parent.name})"
        base, n = label, 2
        while label in runs:  # still taken (same default label and same folder name): number it, never drop a curve
            label, n = f"{base} #{n}", n + 1
        runs[label] = blocks
    return error_curves(runs, out, title)
