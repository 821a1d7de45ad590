"""Render bench/results/*.json as the markdown tables quoted in BENCHMARKS.md.

    python bench/summarize.py bench/results/vs_llmcompressor_64x512.json bench/results/grid_64x512.json
    python bench/summarize.py --llmc-row wanda:0.5 ONESHOT.json EVAL_DIR/report.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    r = json.loads(open(path).read())
    out = [f"### `{path}`", "", f"`python {r['command']}`", "",
           f"model {r['model']}; calibration C4 {r['nsamples']} × {r['seqlen']} (seed {r['seed']}); "
           f"ppl = {r['eval']}; {r['precision']}; {r['threads']} threads; "
           f"memory budget (model {r['model_mib']:.0f} MiB + 2 × activations {r['activations_mib']:.0f} MiB "
           f"+ 1 GiB) = {r['memory_budget_mib']:.0f} MiB", ""]
    if "dense" in r:
        d = r["dense"]
        out += [f"dense: {d['metric']} = **{d['ppl']:.3f}** ({d['windows']} of {d['total_windows']} windows, "
                f"{d['tokens']} tokens)", ""]
    if r["runs"]:
        out += ["| job | tool | prune s | peak RSS MiB | measured sparsity | ppl | time vs llmc | ppl − llmc |",
                "|---|---|---|---|---|---|---|---|"]
        for x in r["runs"]:
            ratio = f"{x['time_ratio_vs_llmc']:.2f}×" if "time_ratio_vs_llmc" in x else ""
            dppl = f"{x['ppl_vs_llmc']:+.3f}" if "ppl_vs_llmc" in x else ""
            out.append(f"| {x['job']} | {x['tool']} | {x['prune_seconds']:.1f} | {x['peak_rss_mib']:.0f} | "
                       f"{x['measured_sparsity']:.4f} | {x['ppl']:.3f} | {ratio} | {dppl} |")
    return "\n".join(out) + "\n"


def llmc_row(job: str, oneshot_json: str, eval_report_json: str) -> str:
    """A table row for an llmcompressor run whose pruning result and evaluation were written separately
    (bench/llmc_prune.py's --result_json and `sparsellm eval ppl --save`)."""
    o = json.loads(open(oneshot_json).read())
    e = json.loads(open(eval_report_json).read())["eval"]["wikitext2_ppl@2048"]
    return (f"| {job} | llmcompressor | {o['oneshot_seconds']:.1f} | {o['peak_rss_mib']:.0f} | "
            f"{o['measured_sparsity']:.4f} | {e['ppl']:.3f} | | |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--llmc-row":
        print(llmc_row(*args[1:4]))
    else:
        print("\n".join(table(p) for p in args))
