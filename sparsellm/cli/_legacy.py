"""Interim: `finetune` and `search` flags and runs as they were in the old single-module CLI (being moved
to runs/finetune.py and runs/search.py)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

from .. import pipeline as api
from ..errors import UsageError
from ..outputs import write_json_atomic, write_text_atomic
from ..runs.rundir import save_pruned

log = logging.getLogger("sparsellm")


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
    from ..evaluate.zeroshot import PAPER_TASKS, TASKS

    p.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help=f"zero-shot tasks, comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents of each task")
    p.add_argument(batch_flag, dest="zeroshot_batch_size", type=int, default=8, metavar="N", help="zero-shot batch size")
    p.add_argument("--hellaswag_file", default=None,
                   help="local hellaswag_val.jsonl (HellaSwag is not bundled: its data could not be obtained)")




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




def _datasets(spec: str, zeroshot_ok: bool = True) -> list[str]:
    from ..data import EVAL_SOURCES

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
    from ..evaluate.zeroshot import check_tasks, require_lm_eval

    if args.zeroshot_batch_size < 1:
        raise UsageError(f"zero-shot batch size must be >= 1, got {args.zeroshot_batch_size}")
    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.hellaswag_file, args.limit)
    require_lm_eval()  # installed?
    return tasks


def _evaluate(model, tok, names, seqlen, max_windows, progress, args=None, tasks=()) -> dict:
    from ..evaluate import perplexity

    out = {}
    for name in names:
        if name == "zeroshot":
            from ..evaluate.zeroshot import zeroshot

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




def cmd_finetune(args) -> int:
    import shutil
    import tempfile

    from ..adapt.losa import FinetuneConfig, finetune, prune_like_report
    from ..adapt.train import finetune_examples
    from ..models import context_length, load_model, resolve_model
    from ..outputs import check_output_dir
    from ..report import finetune_comparison, markdown, search_markdown

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise UsageError(f"--method must list distinct methods, got {args.method!r}")
    ratio = args.sparsity_ratio
    if ratio is None and args.sparsity_type == "unstructured":
        ratio = 0.5
    from ..prune import parse_pattern

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
    from ..data import load_documents

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
            save_pruned(model, tok, outs[m], run["prune"], run, markdown(run), overwrite=True, figures=figures)
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

    from .. import plots
    from ..data import calibration_windows
    from ..models import context_length, load_model, resolve_model
    from ..outputs import atomic_dir_write, check_output_dir
    from ..search import GAOperators, LLMOperators, SearchConfig, local_chat, openai_chat
    from ..search.driver import describe, self_prune
    from ..report import search_markdown
    from ..structured.io import write_structured

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
        from ..data import load_documents

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
    from ..structured import struct_spec

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
           "config": {k: v for k, v in vars(args).items() if k not in ("command", "run")}, "search": rep}
    if names:  # the best candidate's perplexities were just computed among the final k
        done = rep["final"][0].get("eval") or {}
        rest = [n for n in names if n == "zeroshot"]
        run["eval"] = {**done, **(_evaluate(pruned, tok, rest, eval_seqlen, args.max_windows, progress, args, tasks)
                                 if rest else {})}
    if args.bench:
        from ..evaluate.speed import compare

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
        write_text_atomic(tmp / "report.md", search_markdown(run))
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
    print(search_markdown(run))
    return 0


