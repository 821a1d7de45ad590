"""`sparsellm report`: several runs side by side (a markdown table, their warnings, and figures)."""

from __future__ import annotations

import json
import math

from .report import acc_text, fmt, ratio_text


def load_run(path) -> tuple[dict, "Path"]:
    """A run's report.json (given the file or its directory) and the directory. Raises UsageError."""
    from pathlib import Path

    from .errors import UsageError

    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    try:
        run = json.loads(f.read_text())
    except FileNotFoundError:
        if p.is_dir() and (p / "comparison.json").is_file():  # a finetune comparison: one record per method
            methods = sorted(d.name for d in p.iterdir() if (d / "report.json").is_file())
            raise UsageError(f"{path} is a fine-tuning comparison: give its methods' directories "
                             f"({', '.join(str(p / m) for m in methods) or 'none finished'})") from None
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
    report, if any; with DeepSparse, also the model in DeepSparse / PyTorch dense fp32; from a GPU bench, the
    model in 2:4 kernels / dense bf16), size on disk of
    the weights in the directory, non-zero block-linear weights."""
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
    if str(run.get("command", "")).startswith("eval") and run.get("evaluated"):  # the evaluated model itself
        e = run["evaluated"]
        dense = e["measured"]["sparsity"] < 0.01 and not e.get("method")
        p = {"measured": e["measured"], "method": e.get("method") or ("dense" if dense else "unknown (no sidecar)"),
             "allocation": e.get("allocation") or {}, "sparsity_type": e.get("sparsity_type") or "",
             "target_sparsity": e.get("target_sparsity", 0.0 if dense else None)}
    ev = run.get("eval", {})
    zs = ev.get("zeroshot")
    speed, spread = _speed(directory / "speed.json") if (directory / "speed.json").is_file() else ({}, {})
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
        "zeroshot_mean_acc_stderr": zs.get("mean_acc_stderr") if zs else None,
        "speed": speed, "speed_spread": spread,
        "size_mib": sum(f.stat().st_size for f in weights) / 2**20 if weights else None,
        "rates": (p.get("allocation") or run.get("allocation") or {}).get("rates"),
        "warnings": list(run.get("warnings") or []),
    }


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _speed(path) -> tuple[dict, dict]:
    """The model's speed ratios and their spreads from a `sparsellm bench` speed.json: fp32 model / dense fp32,
    DeepSparse's as "deepsparse KEY" and the 2:4 kernels' as "2:4 KEY". Raises UsageError (one line) for a
    file that is not valid JSON, not a bench result, or holds a ratio or spread that is not a finite number."""
    from .errors import UsageError

    try:
        sp = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON") from None
    ratios, spreads = (sp.get("ratios"), sp.get("ratio_spread") or {}) if isinstance(sp, dict) else (None, None)
    if not isinstance(ratios, dict) or not isinstance(spreads, dict) \
            or not all(isinstance(r, dict) for r in (*ratios.values(), *spreads.values())):
        raise UsageError(f"{path} is not a sparsellm bench result (no 'ratios' by run); rerun sparsellm bench --save")
    speed, spread = dict(ratios.get("model fp32", {})), dict(spreads.get("model fp32", {}))
    # with --deepsparse: the pruned model in DeepSparse, against PyTorch dense fp32 of the same bench run
    speed.update({f"deepsparse {k}": v for k, v in ratios.get("deepsparse model", {}).items()})
    for name, r in ratios.items():  # `bench --device cuda --kernels semi24`: 2:4 kernels / dense bf16
        if name.startswith("model 2:4"):
            speed.update({f"2:4 {k}": v for k, v in r.items()})
            spread.update({f"2:4 {k}": v for k, v in spreads.get(name, {}).items()})
    for k, v in speed.items():
        if not _number(v):
            raise UsageError(f"{path}: the ratio {k!r} is not a finite number ({v!r}); rerun sparsellm bench --save")
    for k, v in spread.items():
        if not (isinstance(v, dict) and _number(v.get("repeats")) and (v["repeats"] < 2 or (
                _number(v.get("min")) and _number(v.get("max")) and isinstance(v.get("within_noise"), bool)))):
            raise UsageError(f"{path}: the spread of {k!r} is not a sparsellm ratio spread; rerun sparsellm bench --save")
    return speed, spread


def compare_runs(paths, out=None) -> str:
    """`sparsellm report`: the runs at `paths` (directories or report.json files) side by side, then each
    run's warnings (quality warnings from `checks`), one line each. With `out`,
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
        except UsageError:
            raise
        except (AttributeError, TypeError, KeyError, ValueError):
            raise UsageError(f"{path} is not a sparsellm run report (its sections are not the ones runs write)") from None
    table = runs_table(rows)
    warned = [f"- {r['dir']}: {w}" for r in rows for w in r.get("warnings", [])]
    if warned:
        table += "\n\n**warnings**\n\n" + "\n".join(warned)
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
        cells = [r["dir"], r["method"], r["allocation"], r["sparsity_type"], fmt(r["target"], ".2f"),
                 fmt(r["measured"], ".4f"), *[fmt(r["ppl"].get(k), ".3f") for k in metrics],
                 acc_text(r["zeroshot_mean_acc"], r.get("zeroshot_mean_acc_stderr")), *[ratio_text(r["speed"][s], r.get("speed_spread", {}).get(s)) if s in r["speed"] else "—"
                   for s in speeds],
                 fmt(r["size_mib"], ".1f"), "—" if r["nonzeros"] is None else f"{r['nonzeros']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
