"""`sparsellm` command line: `prune` and `eval ppl`.

Bad input gets one line on stderr and exit status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict
import os
import signal
import sys
import time
from pathlib import Path

from .errors import UsageError
from .outputs import write_json_atomic, write_text_atomic

log = logging.getLogger("sparsellm")

DEMO = ["--model", "smollm2-135m", "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--nsamples", "32",
        "--seqlen", "512", "--eval", "wikitext2", "--eval_seqlen", "2048", "--max_windows", "4", "--eval_dense"]


def _add_model_args(p, evaluate_only: bool = False):
    p.add_argument("--model", default="smollm2-135m",
                   help="HF hub id, local HF directory, .gguf file or preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the model for evaluation" if evaluate_only else
                   "dtype of the model for calibration forwards, pruning and evaluation "
                   "(statistics are always accumulated in float32)")


def _add_eval_args(p, default_eval):
    p.add_argument("--eval", default=default_eval,
                   help="comma-separated: wikitext2, c4 (perplexity), zeroshot (lm-eval, see --tasks), or none")
    p.add_argument("--eval_seqlen", type=int, default=None,
                   help="window length for perplexity (default: the calibration --seqlen, capped at context)")
    p.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    _add_zeroshot_args(p, "--zeroshot_batch_size")


def _add_zeroshot_args(p, batch_flag):
    from .evaluate.zeroshot import PAPER_TASKS, TASKS

    p.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help=f"zero-shot tasks, comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents of each task")
    p.add_argument(batch_flag, dest="zeroshot_batch_size", type=int, default=8, metavar="N", help="zero-shot batch size")
    p.add_argument("--hellaswag_file", default=None,
                   help="local hellaswag_val.jsonl (HellaSwag is not bundled: its data could not be obtained)")


def _add_prune_args(p):
    _add_model_args(p)
    p.add_argument("--prune_method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="magnitude: |W| per matrix; wanda: |W|·‖X‖ per output row; sparsegpt: OBS weight update")
    p.add_argument("--sparsity_ratio", type=float, default=None,
                   help="target fraction of zeros in [0, 1); 0.5 when left out; implied by an N:M --sparsity_type")
    p.add_argument("--sparsity_type", default="unstructured",
                   help="unstructured, or N:M = keep N of every M input weights (2:4, 4:8, ...)")
    p.add_argument("--prunen", type=int, default=None, help="alias: N of an N:M pattern (with --prunem)")
    p.add_argument("--prunem", type=int, default=None, help="alias: M of an N:M pattern (with --prunen)")
    p.add_argument("--allocation", default="uniform",
                   help="layer-wise sparsity: uniform, atp (with --atp_beta), owl, rmi, or file:rates.json "
                        "(a list, or a dict by block index, whose mean is the target)")
    p.add_argument("--atp_beta", type=float, default=0.0,
                   help="ATP's common difference β: block i gets S − β(L−1)/2 + β·i")
    p.add_argument("--allow_mean_mismatch", action="store_true",
                   help="accept a rates file whose mean is not --sparsity_ratio (the measured sparsity will differ)")
    p.add_argument("--owl_m", type=float, default=5.0, help="OWL's M: outliers are scores > M × the mean")
    p.add_argument("--owl_lambda", type=float, default=0.08, help="OWL's λ: rates stay within S ± λ")
    p.add_argument("--owl_granularity", default="block", choices=["block", "layer"],
                   help="OWL: one rate per decoder block, or one per linear layer")
    p.add_argument("--rmi_nsamples", type=int, default=64, help="RMI: calibration windows for the block CKA")
    p.add_argument("--rmi_beta", type=float, default=None,
                   help="RMI importance exp(−β·redundancy) (default when left out: 1 for wanda, 100 for sparsegpt)")
    p.add_argument("--rmi_delta", type=float, default=None,
                   help="RMI: rates stay within S ± δ (default when left out: 0.01/0.02/0.03 for S <= 0.5/0.6/larger)")
    p.add_argument("--diag_nsamples", type=int, default=None,
                   help="windows also run through the dense blocks for the cumulative reconstruction "
                        "error per block (default when left out: 8, or 0 for magnitude); 0 turns it off")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", "--calib_seqlen", dest="seqlen", type=int, default=2048,
                   help="tokens per calibration window (capped at the model's context)")
    p.add_argument("--calib_dataset", default="c4",
                   help="c4 (bundled) or a local .txt / .jsonl / .json.gz / .jsonl.gz file with a 'text' field")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="calibration windows per block forward (default: about 2048 tokens per forward, at least one window)")
    p.add_argument("--save_model", default=None, help="write the pruned HF model directory here")
    p.add_argument("--save", default=None, help="directory to write report.json and report.md into")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_model directory")
    p.add_argument("--eval_dense", action="store_true", help="also evaluate the dense model first")
    _add_eval_args(p, "wikitext2")


def _add_finetune_args(p):
    _add_model_args(p)
    p.add_argument("--method", default="losa",
                   help="losa, masked-lora (static), lora (plain, merged: loses sparsity), none; comma-separated "
                        "runs each on the same data, into OUT/<method>/, plus OUT/comparison.md")
    p.add_argument("--sparsity_ratio", type=float, default=None, help="target S in [0, 1); 0.5 when left out")
    p.add_argument("--sparsity_type", default="unstructured", help="unstructured or N:M (not with losa)")
    p.add_argument("--prune_method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="pruner for the baselines' prune and LoSA's re-pruning (the paper: wanda or sparsegpt)")
    p.add_argument("--steps", type=int, default=5, help="LoSA: T steps, sparsity s_t = S − S(1 − t/T)³")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows for pruning")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--calib_dataset", default="c4", help="c4 (bundled) or a local text file")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration windows (fine-tuning data: seed + 1)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening")
    p.add_argument("--batch_size", type=int, default=None,
                   help="calibration windows per block forward (default: about 2048 tokens per forward, at least one window)")
    p.add_argument("--rmi_nsamples", type=int, default=64, help="LoSA: windows for RMI's CKA at every step")
    p.add_argument("--rank_nsamples", type=int, default=8,
                   help="LoSA: windows whose dense block outputs are kept for the rank allocation")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank r (scaling α/r)")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA α")
    p.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the adapter's input")
    p.add_argument("--r_max", type=int, default=16, help="LoSA: largest per-block rank (size of the factors)")
    p.add_argument("--rank_start", type=float, default=6.0, help="LoSA: mean rank at the first step")
    p.add_argument("--rank_end", type=float, default=10.0, help="LoSA: mean rank at the last step")
    p.add_argument("--data", default="c4",
                   help="fine-tuning data: c4 (bundled), a text file, or an Alpaca-style instruction .json/.jsonl")
    p.add_argument("--ft_nsamples", type=int, default=64, help="fine-tuning examples (the token budget)")
    p.add_argument("--ft_seqlen", type=int, default=512, help="tokens per fine-tuning example (at most)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--ft_batch_size", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimiser step")
    p.add_argument("--warmup_ratio", type=float, default=0.3, help="linear warm-up, fraction of optimiser steps")
    p.add_argument("--weight_decay", type=float, default=0.001, help="AdamW weight decay")
    p.add_argument("--max_grad_norm", type=float, default=0.3, help="gradient clipping")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--step_eval_windows", type=int, default=4,
                   help="WikiText-2 windows scored after every step (0: none)")
    p.add_argument("--out", required=True, help="output directory (the merged sparse model, adapter/, reports)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted LoSA run from OUT.ckpt")
    p.add_argument("--keep_checkpoint", action="store_true", help="keep OUT.ckpt after a successful run")
    p.add_argument("--eval_dense", action="store_true", help="also evaluate the input model first")
    _add_eval_args(p, "wikitext2")


def _add_search_args(p):
    _add_model_args(p)
    p.add_argument("--target_rate", type=float, default=0.3, help="mean structured rate over the blocks, in [0, 1)")
    p.add_argument("--max_rate", type=float, default=0.8, help="largest rate of one block")
    p.add_argument("--metric", default="wanda-sp", choices=["wanda-sp", "flap", "magnitude-sp"],
                   help="importance of heads and channels (flap adds its bias compensation)")
    p.add_argument("--gqa", default="query", choices=["query", "group"],
                   help="GQA: remove equal numbers of query heads per KV group, or whole KV groups")
    p.add_argument("--backend", default="ga", choices=["ga", "llm", "openai", "local", "uniform"],
                   help="search operators: ga (classical), openai (any OpenAI-compatible endpoint), local "
                        "(a chat model in-process), llm (openai when --llm_base_url is given, else local), "
                        "uniform (no search: the target rate everywhere)")
    p.add_argument("--population", type=int, default=30, help="population size N")
    p.add_argument("--generations", type=int, default=20, help="generations G (0: the initial population only)")
    p.add_argument("--crossover", type=int, default=10, help="children from crossover per generation")
    p.add_argument("--mutation", type=int, default=10, help="children from mutation per generation")
    p.add_argument("--llm_base_url", default=None, help="openai backend: e.g. http://localhost:8000/v1")
    p.add_argument("--llm_model", default=None, help="openai backend: the model name the endpoint serves")
    p.add_argument("--llm_api_key_env", default="OPENAI_API_KEY", help="openai backend: env variable with the key")
    p.add_argument("--local_model", default="smollm2-135m", help="local backend: the chat model (any --model form)")
    p.add_argument("--llm_temperature", type=float, default=0.7, help="sampling temperature of the search LLM")
    p.add_argument("--llm_retries", type=int, default=2, help="retries of a bad reply before the GA fallback")
    p.add_argument("--fitness_windows", type=int, default=4, help="held-out C4-validation windows per fitness")
    p.add_argument("--fitness_seqlen", type=int, default=512, help="tokens per fitness window")
    p.add_argument("--final_k", type=int, default=3, help="best candidates re-scored with --eval at the end")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for the importance")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--calib_dataset", default="c4", help="c4 (bundled) or a local text file")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of the search")
    p.add_argument("--bench", action="store_true", help="measure prefill / decode speed against dense at the end")
    p.add_argument("--out", required=True, help="output directory: the pruned model (structure.json), reports, plots")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs and search state")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search from OUT.search/")
    p.add_argument("--keep_state", action="store_true", help="keep OUT.search/ after a successful run")
    _add_eval_args(p, "wikitext2")
    for a in p._actions:
        if a.dest == "eval_seqlen":
            a.help = "window length for perplexity (default: 2048, capped at the model's context)"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say it and there is a value to show."""

    def _get_help_string(self, action):
        d = action.default  # by identity: 0 and 0.0 are real defaults, though 0 == False
        if "default" in (action.help or "") or d is None or d is False or d is argparse.SUPPRESS or d == "":
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as every other bad input, and each default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"sparsellm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsellm", description="Post-training sparsification of LLMs.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or per-block lines (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model (no arguments: a demo on the default model, about 10 min on 2 cores)")
    _add_prune_args(p)
    a = sub.add_parser("allocate", help="layer-wise sparsity rates (ATP with --search, OWL, RMI, ...), "
                       "written as rates.json; then prune and evaluate with them")
    _add_prune_args(a)
    a.add_argument("--search", action="store_true",
                   help="ATP: try β = 0, --atp_step, ... < β_max and keep the β with the lowest objective")
    a.add_argument("--atp_step", type=float, default=0.002, help="ATP search grid step (paper: 0.002)")
    a.add_argument("--objective", default="c4", choices=["c4", "wikitext2"],
                   help="search objective: c4 validation windows (held out), or wikitext2 test windows "
                        "(what ATP's released code does; flagged as test-set selection in the report)")
    a.add_argument("--objective_windows", type=int, default=8, help="windows scored per β")
    a.add_argument("--objective_seqlen", type=int, default=None,
                   help="window length of the objective (default: --eval_seqlen)")


    f = sub.add_parser("finetune", help="recover a sparse model's quality with sparsity-preserving LoRA: LoSA "
                       "(dynamic) and its baselines (none, lora, masked-lora) at an equal token budget")
    _add_finetune_args(f)

    se = sub.add_parser("search", help="Self-Pruner: structured pruning (heads and MLP channels) at layer-wise rates "
                        "found by an evolutionary search with LLM (openai, local) or GA operators")
    _add_search_args(se)

    pe = sub.add_parser("plot-errors", help="draw the per-block reconstruction errors of one or more runs "
                        "on one figure (PNG)")
    pe.add_argument("reports", nargs="+", help="report.json files written by prune/allocate (--save or --save_model)")
    pe.add_argument("--out", required=True, help="PNG file to write")
    pe.add_argument("--labels", default=None, help="comma-separated legend labels, one per report")
    pe.add_argument("--title", default="", help="figure title")

    b = sub.add_parser("bench", help="measured inference speed of a model against its dense baseline, "
                       "in one process")
    b.add_argument("--model", required=True, help="the (pruned) model: directory, hub id, .gguf or preset")
    b.add_argument("--baseline", default=None,
                   help="the dense model (default: the 'model' recorded in the pruned model's report.json)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--prefill", default="128,512,2048", help="prefill lengths in tokens")
    b.add_argument("--decode_batches", default="1,8", help="batch sizes of the KV-cache decode loop")
    b.add_argument("--decode_prompt", type=int, default=128, help="prompt tokens before the timed decode steps")
    b.add_argument("--new_tokens", type=int, default=32, help="decode steps timed per run")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    b.add_argument("--no_bf16", action="store_true", help="skip the bfloat16 runs")
    b.add_argument("--deepsparse", action="store_true",
                   help="also run both models, exported to ONNX, in DeepSparse 1.8 (needs `make deepsparse-env`)")
    b.add_argument("--deepsparse_python", default=None,
                   help="the Python of the DeepSparse environment (default: $SPARSELLM_DEEPSPARSE_PYTHON, "
                   "else .venv-deepsparse/bin/python)")
    b.add_argument("--save", default=None, help="directory to write speed.json into (e.g. the run directory)")

    rp = sub.add_parser("report", help="put several runs side by side: one markdown table and PNG plots")
    rp.add_argument("runs", nargs="+", help="run directories (--save or --save_model) or their report.json")
    rp.add_argument("--out", default=None, help="directory for report.md, ppl_vs_sparsity.png and rates.png")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    ep = esub.add_parser("ppl", help="perplexity by the papers' protocol")
    _add_model_args(ep, evaluate_only=True)
    ep.add_argument("--dataset", default="wikitext2", help="comma-separated: wikitext2, c4")
    ep.add_argument("--seqlen", type=int, default=2048, help="window length")
    ep.add_argument("--max_windows", type=int, default=None, help="score only the first N windows")
    ep.add_argument("--save", default=None, help="directory to write report.json into")
    ez = esub.add_parser("zeroshot", help="zero-shot accuracy with lm-evaluation-harness on the bundled tasks")
    _add_model_args(ez, evaluate_only=True)
    _add_zeroshot_args(ez, "--batch_size")
    ez.add_argument("--save", default=None, help="directory to write report.json into")
    for sp in (p, a, f, se, pe, b, rp, e, ep, ez):  # `sparsellm prune --quiet` works too; SUPPRESS keeps the global one
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or per-block lines (same as sparsellm --quiet)")
    return parser


def _datasets(spec: str, zeroshot_ok: bool = True) -> list[str]:
    from .data import EVAL_SOURCES

    allowed = EVAL_SOURCES + (("zeroshot",) if zeroshot_ok else ())
    names = [] if spec.strip().lower() == "none" else [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in allowed:
            raise UsageError(f"unknown evaluation {n!r}; choose from {', '.join(allowed)} or none")
    return names


def _zeroshot_tasks(args, names) -> list[str]:
    """Validate --tasks / --limit / --hellaswag_file up front when zero-shot evaluation is asked for."""
    if "zeroshot" not in names:
        return []
    from .evaluate.zeroshot import _lm_eval, check_tasks

    if args.zeroshot_batch_size < 1:
        raise UsageError(f"zero-shot batch size must be >= 1, got {args.zeroshot_batch_size}")
    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.hellaswag_file, args.limit)
    _lm_eval()  # installed?
    return tasks


def _evaluate(model, tok, names, seqlen, max_windows, progress, args=None, tasks=()) -> dict:
    from .evaluate import perplexity

    out = {}
    for name in names:
        if name == "zeroshot":
            from .evaluate.zeroshot import zeroshot

            r = zeroshot(model, tok, list(tasks), args.limit, args.zeroshot_batch_size, args.hellaswag_file)
            log.info("zero-shot mean acc = %.4f over %s", r["mean_acc"], ", ".join(r["tasks"]))
            out["zeroshot"] = r
            continue
        r = perplexity(model, tok, name, seqlen, max_windows, progress=progress)
        log.info("%s = %.3f (%d windows, %d tokens)", r["metric"], r["ppl"], r["windows"], r["tokens"])
        out[r["metric"]] = r
    return out


def _dtype(name):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cmd_prune(args) -> int:
    from . import api
    from .models import context_length, load_model, resolve_model
    from .outputs import check_output_dir
    from .report import markdown, search_line, summary_table

    if args.prunen is not None or args.prunem is not None:
        if args.prunen is None or args.prunem is None:
            raise UsageError("--prunen and --prunem go together")
        args.sparsity_type = f"{args.prunen}:{args.prunem}"
    ratio = args.sparsity_ratio
    if ratio is None and args.sparsity_type == "unstructured":
        ratio = 0.5
    config = api.PruneConfig(
        prune_method=args.prune_method, sparsity_ratio=ratio, sparsity_type=args.sparsity_type,
        nsamples=args.nsamples, seqlen=args.seqlen, calib_dataset=args.calib_dataset, seed=args.seed,
        allocation=args.allocation, atp_beta=args.atp_beta, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
        owl_granularity=args.owl_granularity, rmi_nsamples=args.rmi_nsamples, rmi_beta=args.rmi_beta,
        rmi_delta=args.rmi_delta, diag_nsamples=args.diag_nsamples, allow_mean_mismatch=args.allow_mean_mismatch,
        blocksize=args.blocksize,
        percdamp=args.percdamp, batch_size=args.batch_size,
    ).validate()
    search = args.command == "allocate" and args.search
    if search:
        if config.allocation != "atp":
            raise UsageError("--search is ATP's β search: use it with --allocation atp")
        if config.atp_beta:
            raise UsageError("--search chooses β itself: leave out --atp_beta")
        if args.objective_windows < 1:
            raise UsageError(f"--objective_windows must be >= 1, got {args.objective_windows}")
        if args.objective_seqlen is not None and args.objective_seqlen < 2:
            raise UsageError(f"--objective_seqlen must be >= 2, got {args.objective_seqlen}")
        from .atp_search import check_step

        check_step(args.atp_step)  # before loading; the trial count is checked against the model's depth
    names = _datasets(args.eval)
    tasks = _zeroshot_tasks(args, names)
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {args.max_windows}")
    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        raise UsageError(f"--eval_seqlen must be >= 2, got {args.eval_seqlen}")
    if args.calib_dataset != "c4":
        from .data import load_documents

        load_documents(args.calib_dataset)  # fail early on a missing or unusable file
    kind, src = resolve_model(args.model)
    if src is not None and (Path(src) / "structure.json").is_file():
        raise UsageError(f"{args.model} is a structured model with per-block widths; pruning it again is not supported")
    inputs = [src, Path(args.calib_dataset) if args.calib_dataset != "c4" else None,
              Path(args.allocation[5:]) if args.allocation.startswith("file:") else None]
    out = None
    if args.save_model is not None:
        out = check_output_dir(args.save_model, args.overwrite, inputs)
    if args.save is not None:
        check_output_dir(args.save, True, inputs + [out], replaces=False)  # only report.json / .md written there
        written = [Path(args.save) / n for n in ("report.json", "report.md", "rates.json", "errors.png",
                                                  "atp_search.png")]
        for p in inputs[1:]:
            if p is not None and any(w.resolve() == Path(p).expanduser().resolve() for w in written):
                raise UsageError(f"--save {args.save} would overwrite the input file {p}")

    model, tok, model_dir = load_model(args.model, _dtype(args.dtype))
    if model_dir is not None:
        for path in (args.save_model, args.save):
            if path is not None:
                reports = path == args.save
                check_output_dir(path, reports or args.overwrite, [model_dir], replaces=not reports)
    seqlen = api.validate_for_model(model, config)
    if search:
        from .atp_search import beta_grid
        from .models import get_blocks

        beta_grid(len(get_blocks(model)), config.sparsity_ratio, args.atp_step)  # before any calibration or eval
    from .data import calibration_windows

    calib = calibration_windows(tok, config.calib_dataset, config.nsamples, seqlen, config.seed)
    eval_seqlen = min(args.eval_seqlen or seqlen, context_length(model))
    progress = not args.quiet
    local = model_dir or src
    run = {"command": args.command, "model": args.model, "model_path": str(local) if local else None,
           "config": api.config_dict(config), "eval_seqlen": eval_seqlen}
    if args.eval_dense and names:
        run["eval_dense"] = _evaluate(model, tok, names, eval_seqlen, args.max_windows, progress, args, tasks)
    if search:
        from .atp_search import search as atp_search

        run["search"] = atp_search(model, tok, calib, config.prune_method, config.sparsity_ratio, args.atp_step,
                                   args.objective, args.objective_windows,
                                   min(args.objective_seqlen or eval_seqlen, context_length(model)),
                                   options={"blocksize": config.blocksize, "percdamp": config.percdamp},
                                   batch_size=config.batch_size, progress=progress)
        run["search"]["objective"]["also_evaluated"] = args.objective in names  # then not held out from it
        config.atp_beta = run["search"]["best_beta"]
        run["config"]["atp_beta"] = config.atp_beta
    rates = api.resolve_allocation(model, config, calib, progress)
    run["allocation"] = rates[1]
    if args.command == "prune" or names or out is not None:
        run["prune"] = api.prune(model, tok, config, calib_ids=calib, progress=progress, rates=rates)
        if names:
            run["eval"] = _evaluate(model, tok, names, eval_seqlen, args.max_windows, progress, args, tasks)
    run["peak_rss_mib"] = api.peak_rss_mib()
    md = markdown(run)
    figures = _figures(run)
    if out is not None:
        api.save_pruned(model, tok, out, run["prune"], run, md, overwrite=args.overwrite, figures=figures)
        log.info("saved pruned model to %s", out)
    if args.save is not None:
        save = Path(args.save)
        write_json_atomic(save / "report.json", run)
        write_text_atomic(save / "report.md", md)
        if args.command == "allocate":
            write_json_atomic(save / "rates.json", [round(r, 12) for r in run["allocation"]["rates"]])
        for name, draw in figures.items():
            draw(save / name)
    if args.command == "allocate":
        if search:
            print(search_line(run["search"]))
        print("rates: " + " ".join(f"{r:.4f}" for r in run["allocation"]["rates"]))
    print(summary_table(run))
    return 0


def cmd_finetune(args) -> int:
    import shutil
    import tempfile

    from . import api
    from .adapt.losa import FinetuneConfig, finetune, prune_like_report
    from .adapt.train import finetune_examples
    from .models import context_length, load_model, resolve_model
    from .outputs import check_output_dir
    from .report import finetune_comparison, markdown

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise UsageError(f"--method must list distinct methods, got {args.method!r}")
    ratio = args.sparsity_ratio
    if ratio is None and args.sparsity_type == "unstructured":
        ratio = 0.5
    from .prune import parse_pattern

    nm = parse_pattern(args.sparsity_type)
    if nm is not None:
        if ratio is not None and abs(ratio - nm.sparsity) > 1e-9:
            raise UsageError(f"--sparsity_ratio {ratio} contradicts the {nm} pattern; leave it out for N:M")
        ratio = nm.sparsity
    configs = {m: FinetuneConfig(
        method=m, sparsity_ratio=ratio, sparsity_type=args.sparsity_type, prune_method=args.prune_method,
        steps=args.steps, nsamples=args.nsamples, seqlen=args.seqlen, calib_dataset=args.calib_dataset, seed=args.seed,
        blocksize=args.blocksize, percdamp=args.percdamp, batch_size=args.batch_size, rmi_nsamples=args.rmi_nsamples,
        rank_nsamples=args.rank_nsamples, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        r_max=args.r_max, rank_start=args.rank_start, rank_end=args.rank_end, lr=args.lr,
        ft_batch_size=args.ft_batch_size, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, step_eval_windows=args.step_eval_windows,
        eval_seqlen=args.eval_seqlen or 2048).validate() for m in methods}
    if args.ft_nsamples < 1 or args.ft_seqlen < 2:
        raise UsageError("--ft_nsamples must be >= 1 and --ft_seqlen >= 2")
    if "losa" in configs and args.ft_nsamples < args.steps:
        raise UsageError(f"--ft_nsamples {args.ft_nsamples} cannot give each of the {args.steps} LoSA steps its own slice")
    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        raise UsageError(f"--eval_seqlen must be >= 2, got {args.eval_seqlen}")
    if args.resume and "losa" not in configs:
        raise UsageError("--resume continues an interrupted LoSA run (--method losa)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    names = _datasets(args.eval)
    tasks = _zeroshot_tasks(args, names)
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {args.max_windows}")
    from .data import load_documents

    for src in {args.calib_dataset, args.data} - {"c4"}:
        if not Path(src).expanduser().is_file():
            raise UsageError(f"data file not found: {src}")
    if args.calib_dataset != "c4":
        load_documents(args.calib_dataset)
    kind, src = resolve_model(args.model)
    inputs = [src, *(Path(p) for p in {args.calib_dataset, args.data} - {"c4"})]
    root = Path(args.out)
    single = len(methods) == 1
    outs = {m: root if single else root / m for m in methods}
    ckpts = {m: Path(f"{outs[m]}.ckpt") for m in methods}
    if src is not None and (Path(src) / "structure.json").is_file():
        raise UsageError(f"{args.model} is a structured model with per-block widths; fine-tuning it is not supported")
    for m in methods:  # the checkpoint directories are deleted at the end: never an input
        check_output_dir(ckpts[m], True, inputs)
    if not single and not args.overwrite:
        old = [f.name for f in (root / "comparison.md", root / "comparison.json") if f.exists()]
        if old and not args.resume:
            raise UsageError(f"{root} already holds {' and '.join(old)} of another run: add --overwrite to replace it")
    done = set()
    for m in methods:
        if args.resume and (outs[m] / "report.json").is_file() and not ckpts[m].exists():
            old = json.loads((outs[m] / "report.json").read_text()).get("config", {})
            new = asdict(configs[m])
            diff = sorted(k for k in new if k != "eval_seqlen" and old.get(k) != new[k])
            if diff:
                raise UsageError(f"--resume: {outs[m]} was finished with other settings ({', '.join(diff)})")
            done.add(m)  # finished before the interruption
            continue
        check_output_dir(outs[m], args.overwrite, inputs)
        if m == "losa" and ckpts[m].exists() and not (args.resume or args.overwrite):
            raise UsageError(f"a checkpoint of an interrupted run is at {ckpts[m]}: add --resume to continue it, "
                             "or --overwrite to start again")
        if args.resume and m == "losa" and not (ckpts[m] / "state.json").is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpts[m]}")
    if not single and args.resume and not args.overwrite and (root / "comparison.json").is_file():
        listed = sorted(json.loads((root / "comparison.json").read_text()))
        if set(listed) != set(methods):
            raise UsageError(f"--resume: {root} holds a finished comparison of [{', '.join(listed)}], "
                             f"not [{', '.join(methods)}]; add --overwrite to start a new one")
    progress = not args.quiet
    examples = None
    results = {}
    for m in methods:
        if m in done:
            results[m] = json.loads((outs[m] / "report.json").read_text())
            log.info("%s: finished before, skipped (%s)", m, outs[m])
            continue
        model, tok, model_dir = load_model(args.model, _dtype(args.dtype))
        if model_dir is not None:
            check_output_dir(outs[m], args.overwrite or (args.resume and m == "losa"), [model_dir])
        cfg = configs[m]
        cfg.eval_seqlen = min(args.eval_seqlen or min(args.seqlen, 2048), context_length(model))
        if examples is None:
            ft_seqlen = min(args.ft_seqlen, context_length(model))
            if ft_seqlen < args.ft_seqlen:
                log.warning("--ft_seqlen %d exceeds the model's context %d; using %d", args.ft_seqlen, ft_seqlen, ft_seqlen)
            examples = finetune_examples(tok, args.data, args.ft_nsamples, ft_seqlen, args.seed + 1)
        run = {"command": "finetune", "model": args.model, "model_path": str(model_dir or src) if (model_dir or src) else None,
               "config": asdict(cfg), "data": {"source": args.data, "ft_nsamples": len(examples),
                                                 "ft_seqlen": args.ft_seqlen, "seed": args.seed + 1}}
        if args.eval_dense and names:
            run["eval_dense"] = _evaluate(model, tok, names, cfg.eval_seqlen, args.max_windows, progress, args, tasks)
        if args.overwrite and ckpts[m].exists():
            shutil.rmtree(ckpts[m])
        with tempfile.TemporaryDirectory(prefix="sparsellm-adapter-") as adir:
            rep = finetune(model, tok, cfg, examples, checkpoint_dir=ckpts[m] if m == "losa" else None,
                           resume=args.resume and m == "losa",
                           model_id=f"{model_dir or src or args.model} ({args.dtype})",
                           adapter_dir=adir if m != "none" else None, progress=progress)
            run["finetune"] = rep
            run["prune"] = prune_like_report(model, cfg, rep, min(args.seqlen, context_length(model)))
            if names:
                run["eval"] = _evaluate(model, tok, names, cfg.eval_seqlen, args.max_windows, progress, args, tasks)
            run["peak_rss_mib"] = api.peak_rss_mib()
            figures = {} if m == "none" else {"adapter": lambda path, a=adir: shutil.copytree(a, path)}
            api.save_pruned(model, tok, outs[m], run["prune"], run, markdown(run), overwrite=True, figures=figures)
        if ckpts[m].exists() and not args.keep_checkpoint:
            shutil.rmtree(ckpts[m])
        log.info("%s: saved to %s (measured sparsity %.4f)", m, outs[m], rep["measured"]["sparsity"])
        results[m] = run
        del model
    table = finetune_comparison(results)
    if not single:
        write_text_atomic(root / "comparison.md", "# sparsellm finetune\n\n" + table + "\n")
        write_json_atomic(root / "comparison.json", {m: {k: r.get(k) for k in ("finetune", "eval", "config")}
                                                         for m, r in results.items()})
    print(table)
    return 0


def cmd_search(args) -> int:
    import shutil

    from . import api, plots
    from .data import calibration_windows
    from .models import context_length, load_model, resolve_model
    from .outputs import atomic_dir_write, check_output_dir
    from .search import GAOperators, LLMOperators, SearchConfig, local_chat, openai_chat
    from .search.driver import describe, self_prune
    from .structured.io import write_structured

    if args.backend == "llm":
        args.backend = "openai" if args.llm_base_url else "local"
    config = SearchConfig(target_rate=args.target_rate, max_rate=args.max_rate, population=args.population,
                          generations=args.generations, crossover=args.crossover, mutation=args.mutation,
                          seed=args.seed).validate()
    for flag in ("fitness_windows", "fitness_seqlen", "final_k", "nsamples", "seqlen"):
        least = 2 if "seqlen" in flag else 1
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    if args.backend == "openai" and not (args.llm_base_url and args.llm_model):
        raise UsageError("--backend openai needs --llm_base_url and --llm_model")
    if args.llm_retries < 0:
        raise UsageError(f"--llm_retries must be >= 0, got {args.llm_retries}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        raise UsageError(f"--eval_seqlen must be >= 2, got {args.eval_seqlen}")
    if args.resume and args.backend == "uniform":
        raise UsageError("--resume continues a search; --backend uniform does not search")
    names = _datasets(args.eval)
    tasks = _zeroshot_tasks(args, names)
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {args.max_windows}")
    if args.calib_dataset != "c4":
        from .data import load_documents

        load_documents(args.calib_dataset)
    kind, src = resolve_model(args.model)
    out = check_output_dir(args.out, args.overwrite, [src, Path(args.calib_dataset) if args.calib_dataset != "c4" else None])
    state_dir = Path(f"{out}.search")
    check_output_dir(state_dir, True, [src, Path(args.calib_dataset) if args.calib_dataset != "c4" else None])
    if not (args.llm_temperature >= 0 and math.isfinite(args.llm_temperature)):
        raise UsageError(f"--llm_temperature must be a finite number >= 0, got {args.llm_temperature}")
    if (state_dir / "state.json").is_file() and not (args.resume or args.overwrite):
        raise UsageError(f"an interrupted search is at {state_dir}: add --resume to continue it, or --overwrite "
                         "to start again")
    if args.resume and not (state_dir / "state.json").is_file():
        raise UsageError(f"--resume: no search state at {state_dir}")
    model, tok, model_dir = load_model(args.model, _dtype(args.dtype))
    from .structured import struct_spec

    struct_spec(model)
    if args.overwrite and state_dir.exists():
        shutil.rmtree(state_dir)
    progress = not args.quiet
    chat = None
    if args.backend == "openai":
        chat = openai_chat(args.llm_base_url, args.llm_model, args.llm_api_key_env, args.llm_temperature)
    elif args.backend == "local":
        chat = local_chat(args.local_model, args.llm_temperature)
    ops = {"ga": GAOperators(), "uniform": None}.get(args.backend) if chat is None else LLMOperators(
        chat, describe(model, args.model), state_dir / "llm_log.jsonl", args.llm_retries)
    seqlen = min(args.seqlen, context_length(model))
    calib = None if args.metric == "magnitude-sp" else calibration_windows(tok, args.calib_dataset, args.nsamples,
                                                                          seqlen, args.seed)
    eval_seqlen = min(args.eval_seqlen or 2048, context_length(model))
    ppl_names = [n for n in names if n != "zeroshot"]
    final_eval = (lambda m: _evaluate(m, tok, ppl_names, eval_seqlen, args.max_windows, False)) if ppl_names else None
    import hashlib

    settings = {"model": str(model_dir or src or args.model), "backend": args.backend, "dtype": args.dtype,
                "calibration": [args.calib_dataset, args.nsamples, seqlen, args.seed,
                                None if calib is None else hashlib.sha256(calib.numpy().tobytes()).hexdigest()],
                "llm": [args.llm_base_url, args.llm_model, args.local_model, args.llm_temperature, args.llm_retries]}
    t0 = time.perf_counter()
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        pruned, rep = self_prune(model, tok, config, ops, calib, args.metric, args.gqa, args.fitness_windows,
                                 min(args.fitness_seqlen, context_length(model)), state_dir / "state.json",
                                 args.resume, args.final_k, final_eval, settings, progress)
    except BaseException:
        if not (state_dir / "state.json").is_file() and not (state_dir / "llm_log.jsonl").is_file():
            shutil.rmtree(state_dir, ignore_errors=True)  # nothing to resume from
        raise
    run = {"command": "search", "model": args.model, "model_path": str(model_dir or src) if (model_dir or src) else None,
           "config": {k: v for k, v in vars(args).items() if k not in ("command",)}, "search": rep}
    if names:  # the best candidate's perplexities were just computed among the final k
        done = rep["final"][0].get("eval") or {}
        rest = [n for n in names if n == "zeroshot"]
        run["eval"] = {**done, **(_evaluate(pruned, tok, rest, eval_seqlen, args.max_windows, progress, args, tasks)
                                 if rest else {})}
    if args.bench:
        from .evaluate.speed import compare

        run["speed"] = compare({"dense fp32": model, "model fp32": pruned}, (128, 512), (1,), repeats=3,
                               progress=progress)
    run["seconds"] = time.perf_counter() - t0
    run["peak_rss_mib"] = api.peak_rss_mib()
    run["versions"] = api.versions()

    def write(tmp: Path):
        write_structured(pruned, tmp, {"rates": rep["best_rates"], "metric": args.metric, "gqa": args.gqa})
        rep["weights_mib"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 2**20
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "report.json", run)
        write_text_atomic(tmp / "report.md", _search_markdown(run))
        if rep["history"]:
            plots.search_progress(rep["history"], tmp / "fitness.png", f"{args.backend} search, mean rate {args.target_rate:g}")
        plots.structured_rates(rep["best_rates"], args.target_rate, tmp / "rates.png")
        for f in ("state.json", "llm_log.jsonl"):
            if (state_dir / f).is_file():
                shutil.copy(state_dir / f, tmp / ("search_state.json" if f == "state.json" else f))

    atomic_dir_write(out, write)
    if not args.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    log.info("saved the pruned model to %s", out)
    print(_search_markdown(run))
    return 0


def _search_markdown(run) -> str:
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


def _figures(run) -> dict:
    """PNG files to write next to a report: {file name: function(path)}."""
    from . import plots

    figs = {}
    if run.get("prune") and any(b.get("rel_error") is not None for b in run["prune"]["blocks"]):
        label = f"{run['prune']['method']} {run['allocation']['name']}"
        figs["errors.png"] = lambda path: plots.error_curves({label: run["prune"]["blocks"]}, path)
    if run.get("search"):
        figs["atp_search.png"] = lambda path: plots.beta_search(run["search"], path)
    return figs


def cmd_eval_ppl(args) -> int:
    from . import api
    from .models import context_length, load_model, resolve_model
    from .outputs import check_output_dir

    names = ["zeroshot"] if args.eval_command == "zeroshot" else _datasets(args.dataset, zeroshot_ok=False)
    tasks = _zeroshot_tasks(args, names)
    if not names:
        raise UsageError("--dataset none leaves nothing to evaluate; choose wikitext2 and/or c4")
    if not tasks and args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max_windows must be >= 1, got {args.max_windows}")
    if not tasks and args.seqlen < 2:
        raise UsageError(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.save is not None:
        check_output_dir(args.save, True, [resolve_model(args.model)[1]], replaces=False)
    model, tok, _ = load_model(args.model, _dtype(args.dtype))
    seqlen = None if tasks else min(args.seqlen, context_length(model))
    run = {"command": f"eval {args.eval_command}", "model": args.model,
           "eval": _evaluate(model, tok, names, seqlen, getattr(args, "max_windows", None), not args.quiet, args, tasks)}
    run["versions"] = api.versions()
    if args.save is not None:
        write_json_atomic(Path(args.save) / "report.json", run)
    from .report import summary_table

    print(summary_table(run))
    return 0


def _ints(spec: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {spec!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} must be positive integers, got {spec!r}")
    return vals


def cmd_bench(args) -> int:
    import json

    import torch

    from . import api
    from .evaluate.speed import compare
    from .models import PRESETS, load_model, resolve_model

    prefill = _ints(args.prefill, "--prefill")
    batches = _ints(args.decode_batches, "--decode_batches")
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or args.decode_prompt < 1:
        raise UsageError("--repeats, --new_tokens and --decode_prompt must be >= 1 and --warmup >= 0")
    if args.threads is not None and not 1 <= args.threads <= (os.cpu_count() or 1):
        raise UsageError(f"--threads must be between 1 and this machine's {os.cpu_count()} CPUs, got {args.threads}")
    baseline = args.baseline
    kind, src = resolve_model(args.model)
    if baseline is None:
        rep = Path(src) / "report.json" if src is not None and Path(src).is_dir() else None
        if rep is None or not rep.is_file():
            raise UsageError("give the dense model with --baseline (no report.json next to --model names it)")
        recorded = json.loads(rep.read_text())
        baseline = recorded.get("model")
        path = recorded.get("model_path")
        if baseline not in PRESETS and path and Path(path).exists():
            baseline = path  # the dense model as resolved when the run was made, not relative to today's cwd
        if not baseline:
            raise UsageError("give the dense model with --baseline")
    resolve_model(baseline)
    if args.save is not None:
        from .outputs import check_output_dir

        check_output_dir(args.save, True, [], replaces=False)  # only speed.json is added, e.g. to the run dir
    if args.deepsparse:  # a missing runtime environment is reported before any model loads
        from .evaluate.sparse_runtime import find_python

        find_python("deepsparse", args.deepsparse_python)
    dense, _, _ = load_model(baseline, torch.float32)
    sparse, _, _ = load_model(args.model, torch.float32)
    if args.deepsparse:  # every other DeepSparse check, before the long PyTorch runs
        from .evaluate.sparse_runtime import preflight

        preflight({"dense": dense, "model": sparse}, "deepsparse", args.deepsparse_python, prefill,
                  args.decode_prompt, args.new_tokens)
    models = {"dense fp32": dense, "model fp32": sparse}
    if not args.no_bf16:
        models["dense bf16"] = load_model(baseline, torch.bfloat16)[0]
        models["model bf16"] = load_model(args.model, torch.bfloat16)[0]
    res = compare(models, prefill, batches, decode_prompt=args.decode_prompt, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                  threads=args.threads, progress=not args.quiet)
    res.update(model=args.model, baseline=baseline, versions=api.versions())
    if args.deepsparse:
        from .evaluate import sparse_runtime

        if args.save is not None:  # the PyTorch results survive a DeepSparse failure
            write_json_atomic(Path(args.save) / "speed.json", res)
        kept = f"; the PyTorch results are in {Path(args.save) / 'speed.json'}" if args.save else ""
        try:
            ds = sparse_runtime.compare({"dense": dense, "model": sparse}, "deepsparse", args.deepsparse_python,
                                        prefill, batches, decode_prompt=args.decode_prompt,
                                        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                                        threads=args.threads or torch.get_num_threads(), progress=not args.quiet)
        except sparse_runtime.RuntimeCheckFailed as e:
            if args.save is not None:
                write_json_atomic(Path(args.save) / "speed.json", {**res, "deepsparse_failed_check": e.result})
            raise UsageError(f"{e}{kept}") from None
        except RuntimeError as e:
            raise UsageError(f"{e}{kept}") from None
        res["deepsparse"] = ds
        base = res["results"]["dense fp32"]
        for n in ("dense", "model"):  # against PyTorch dense fp32 of this same bench run (another process)
            r = ds["results"][n]
            res["results"][f"deepsparse {n}"] = r
            res["ratios"][f"deepsparse {n}"] = {k: v / base[k] for k, v in r.items() if k in base}
    if "dense bf16" in res["results"]:  # the issue's second baseline, measured in this same run
        b16 = res["results"]["dense bf16"]
        res["ratios_vs_dense_bf16"] = {n: {k: r[k] / b16[k] for k in b16 if k in r}
                                       for n, r in res["results"].items() if n != "dense bf16"}
    print(res["cuda_2_4"], file=sys.stderr)
    if args.save is not None:
        write_json_atomic(Path(args.save) / "speed.json", res)
    keys = list(res["results"]["dense fp32"])
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for n, r in res["results"].items():
        ratio = res["ratios"].get(n, {})
        lines.append(f"| {n} | " + " | ".join(f"{r[k]:.1f} tok/s" + (f" ({ratio[k]:.2f}×)" if ratio else "")
                                              for k in keys) + " |")
    print("\n".join(lines))
    for n, r in res.get("ratios_vs_dense_bf16", {}).items():
        if n != "dense fp32":
            print(f"{n} vs dense bf16: " + ", ".join(f"{k} {v:.2f}×" for k, v in r.items()))
    if args.deepsparse:
        ds = res["deepsparse"]
        print("DeepSparse model vs DeepSparse dense: " + ", ".join(f"{k} {v:.2f}×" for k, v in ds["ratios"]["model"].items()))
        print("DeepSparse vs PyTorch logits on a fixed prompt: " + ", ".join(
            f"{n} max |Δ| {c['max_abs_logit_diff']:.2e}, greedy agreement {c['greedy_agreement']:.2f}"
            for n, c in ds["check"].items()))
    return 0


def cmd_report(args) -> int:
    from . import api, plots
    from .report import load_run, run_row, runs_table

    rows = [run_row(*load_run(path)) for path in args.runs]
    table = runs_table(rows)
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out is a file: {args.out}")
        for path in args.runs:
            run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
            if run_dir.resolve() == out.resolve():
                raise UsageError(f"--out would write into a run directory given as input: {path}")
        write_text_atomic(out / "report.md", "# sparsellm runs\n\n" + table + "\n")
        metrics = list(dict.fromkeys(k for r in rows for k in r["ppl"]))
        if metrics:
            plots.ppl_vs_sparsity(rows, metrics[0], out / "ppl_vs_sparsity.png")
        if any(r["rates"] for r in rows):
            plots.block_rates(rows, out / "rates.png")
    print(table)
    return 0


def cmd_plot_errors(args) -> int:
    import json

    from . import plots

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {args.out}")
    if out.is_dir():
        raise UsageError(f"--out is a directory: {args.out}")
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.reports):
        raise UsageError(f"{len(labels)} labels for {len(args.reports)} reports")
    if labels is not None and len(set(labels)) != len(labels):
        raise UsageError("--labels must be distinct")
    runs = {}
    for k, path in enumerate(args.reports):
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        if p.resolve() == out.resolve():
            raise UsageError(f"--out would overwrite an input: {path}")
        pruned_nothing = False
        try:
            run = json.loads(p.read_text())
            pruned_nothing = isinstance(run, dict) and "allocation" in run and "prune" not in run
            rep = run["prune"]
            blocks = rep["blocks"]
            if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("block"), int)
                                                       for b in blocks):
                raise TypeError
        except FileNotFoundError:
            raise UsageError(f"report not found: {path}") from None
        except OSError as e:  # e.g. a directory named report.json
            raise UsageError(f"cannot read {p}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if pruned_nothing:
                raise UsageError(f"{path} is a run that pruned nothing (allocate with --eval none and no "
                                 "--save_model writes only the rates), so it has no per-block errors to plot") from None
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
    plots.error_curves(runs, out, args.title)
    print(out)
    return 0


class _Terminated(KeyboardInterrupt):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if [x for x in argv if x != "--quiet"] == ["prune"]:
        print("sparsellm: no arguments given, running the demo: sparsellm prune " + " ".join(DEMO), file=sys.stderr)
        argv = argv + DEMO
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error already printed as one line
        return int(e.code or 0)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import huggingface_hub.utils.logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # after import: both libraries reset their loggers when imported
    hub_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            if args.command in ("prune", "allocate"):
                return cmd_prune(args)
            if args.command == "finetune":
                return cmd_finetune(args)
            if args.command == "search":
                return cmd_search(args)
            if args.command == "plot-errors":
                return cmd_plot_errors(args)
            if args.command == "report":
                return cmd_report(args)
            if args.command == "bench":
                return cmd_bench(args)
            return cmd_eval_ppl(args)
    except UsageError as e:
        print(f"sparsellm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print("sparsellm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("sparsellm: interrupted (an output directory is either complete or absent)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
