"""The driver behind `sparsellm finetune`: one entry point for every fine-tuning method, config in, model
changed in place, report out.

    report = finetune(model, tokenizer, FinetuneConfig.from_flat(method="losa", sparsity_ratio=0.5), examples)

`finetune` checks the settings against the model, recognises an already-pruned input (`pruned_input.py`:
its masks and per-block rates are then kept and no method prunes it again), draws the calibration windows
(and the WikiText-2 tokens of the per-step evaluation), and calls the registered method (kind "finetune":
`baselines.py`, `losa.py`) with a `Job` that holds them and the report being filled. Adding a method is one
registered function `fn(job)` with its config class, plus one import line in `adapt/__init__.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from .. import pipeline as api
from ..config import EVAL_SEQLEN
from ..data import calibration_windows
from ..engine import linear_sparsity
from ..errors import UsageError
from ..evaluate.perplexity import eval_tokens, perplexity
from ..lazy import lazy_import
from ..models import block_linears, context_length, get_blocks
from ..provenance import tokens_sha256
from ..registry import get
from .adapter_io import save_adapter
from .config import FinetuneConfig
from .masked_lora import adapter_ranks, lora_layers, remove_adapters
from .pruned_input import PrunedInput, pruned_input, resolve_target
from .train import train

log = logging.getLogger("sparsellm")
MERGE_CHECK_TOKENS = 512  # tokens of the first calibration window on which a merge is compared with the adapters
torch = lazy_import("torch")


@dataclass
class Job:
    """A fine-tuning run in progress: what a method's function reads, and the `report` it fills (each
    method appends its `steps`; the baselines also set `prune` and `train`; a method that merges adapters
    sets `merge` through `merge_checked`). `pruned_input`: what an already-pruned input was pruned to (its
    masks and rates are kept: no method prunes it); None for a dense input. `checkpoint_dir` / `resume` /
    `model_id` are for methods that checkpoint (registered with needs="checkpoint"); `adapter_dir`, when set,
    receives the trained adapter in peft's layout."""

    model: object
    tokenizer: object
    config: FinetuneConfig
    examples: list
    calib: torch.Tensor
    pad_id: int
    eval_seqlen: int
    wiki_ids: torch.Tensor | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    model_id: str = ""
    adapter_dir: Path | None = None
    progress: bool = True
    report: dict = field(default_factory=dict)
    pruned_input: PrunedInput | None = None
    autocast_dtype: object = None  # the model's forward dtype: training autocasts to it on a GPU (`train`)

    def train(self, model, examples) -> dict:
        """Fine-tune the trainable parameters of `model` on `examples` with the config's optimiser loop;
        the loop's report without the optimiser state."""
        t = self.config.training
        out = train(model, examples, lr=t.lr, batch_size=t.ft_batch_size, grad_accum=t.grad_accum,
                    warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                    gradient_checkpointing=t.gradient_checkpointing, pad_id=self.pad_id, progress=self.progress,
                    autocast_dtype=self.autocast_dtype)
        out.pop("optimizer")
        out["examples"] = len(examples)
        return out

    @torch.no_grad()
    def merge_checked(self, merge_fn) -> dict:
        """Merge the adapters with `merge_fn()` and measure what the merge changed: the max |logit difference|
        between the model with its adapters (unmerged) before and the merged model after, on the first
        calibration window (at most MERGE_CHECK_TOKENS tokens). Sets and returns report["merge"]."""
        ids = self.calib[:1, :MERGE_CHECK_TOKENS].to(next(self.model.parameters()).device)
        training = self.model.training
        self.model.eval()  # no dropout: the adapters' output is deterministic
        adapted = self.model(ids).logits.float()
        merge_fn()
        diff = float((self.model(ids).logits.float() - adapted).abs().max())
        self.model.train(training)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.report["merge"] = {"max_abs_logit_diff": diff, "tokens": int(ids.numel()), "dtype": dtype}
        log.info("merged vs adapted model: max |logit difference| %.3g on %d tokens (%s)", diff, ids.numel(), dtype)
        return self.report["merge"]

    def evaluate(self) -> dict | None:
        """WikiText-2 perplexity on the first `step_eval_windows` windows (None when 0)."""
        if not self.config.step_eval_windows:
            return None
        return perplexity(self.model, self.tokenizer, "wikitext2", self.eval_seqlen, self.config.step_eval_windows,
                          progress=self.progress, ids=self.wiki_ids)


def finetune(model, tokenizer, config: FinetuneConfig, examples: list, checkpoint_dir=None, resume: bool = False,
             model_id: str = "", adapter_dir=None, progress: bool = True, eval_seqlen: int = EVAL_SEQLEN,
             sidecar: dict | None = None) -> dict:
    """Run `config.method` on `model`, changed in place, and return the report. On return `model` is a plain
    transformers model again: the adapters are merged and removed (for "lora" by peft's merge_and_unload).
    adapter_dir: if given, the trained adapter is written there first, in peft's layout (`adapter_io`).

    examples: fine-tuning data, list of (input_ids (T,), labels (T,)); every method sees all of it once.
    checkpoint_dir: LoSA writes a checkpoint there after every step; with `resume`, it continues from it
    (the settings, input model id and data must match). eval_seqlen: window length of the per-step
    perplexity (capped at the model's context). sidecar: the input model's `sparsity_config.json`, if any.

    An already-pruned `model` (`pruned_input`) keeps its masks and per-block rates: no method prunes it
    again, and `config`'s sparsity_ratio, when None, becomes the input's (set in `config`); another one
    raises UsageError. The report's `input` says what was found. Raises UsageError for bad settings or data.

    Devices: training runs where `model`'s parameters are (the run moves it to its device first,
    `runs.placement`), with autocast to the model's dtype on a GPU; the adapters are float32. Pruning goes
    through the engine, which follows an attached onloader (`sparsellm.onload`)."""
    requested = config.prune.sparsity_ratio  # None: left out
    config.validate()
    if not examples:
        raise UsageError("no fine-tuning examples")
    method = get("finetune", config.method)
    seqlen = api.validate_for_model(model, config.prune)
    inp = pruned_input(model, sidecar)
    if inp is not None:
        config.prune.sparsity_ratio = resolve_target(requested, config.prune.sparsity_type, inp)
        config.validate()
        log.info("the input model is already pruned (%s): its masks and per-block rates are kept, not pruned "
                 "again", inp.describe())
    eval_seqlen = min(eval_seqlen, context_length(model))
    if resume and (method.needs != "checkpoint" or checkpoint_dir is None):
        raise UsageError("--resume continues a LoSA run from its checkpoint directory")
    check = getattr(config.method_config, "check_examples", None)
    if check is not None:
        check(len(examples))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    c = config.calibration
    torch.manual_seed(c.seed)  # LoRA factor init and dropout: a run is reproducible (resume restores the state)
    t_start = time.perf_counter()
    calib = calibration_windows(tokenizer, c.calib_dataset, c.nsamples, seqlen, c.seed)
    wiki_ids = eval_tokens(tokenizer, "wikitext2", eval_seqlen) if config.step_eval_windows else None
    report = {"method": config.method, "target_sparsity": config.sparsity_ratio,
              "input": inp.to_dict() if inp else {"pruned": False, "measured": linear_sparsity(model)["sparsity"]},
              "calibration": {"dataset": c.calib_dataset, "nsamples": int(calib.shape[0]),
                              "seqlen": int(calib.shape[1]), "seed": c.seed, "tokens_sha256": tokens_sha256(calib),
                              "used": inp is None},
              "tokens_budget": int(sum(int((y != -100).sum()) for _, y in examples)),
              "examples": len(examples), "steps": [], "merge": None}
    job = Job(model, tokenizer, config, examples, calib, pad_id, eval_seqlen, wiki_ids,
              Path(checkpoint_dir) if checkpoint_dir is not None else None, resume, model_id,
              adapter_dir, progress, report, inp, next(model.parameters()).dtype)
    method.fn(job)
    if report["merge"] is None and report["steps"]:  # a LoSA run resumed after its last step
        report["merge"] = report["steps"][-1].get("merge")
    if lora_layers(model):
        report["ranks"] = adapter_ranks(model)
        if adapter_dir is not None:
            save_adapter(model, adapter_dir, model_id or None)
        remove_adapters(model)
    report["measured"] = linear_sparsity(model)
    report["seconds"] = time.perf_counter() - t_start
    report["peak_rss_mib"] = api.peak_rss_mib()
    return report


def prune_like_report(model, config: FinetuneConfig, report: dict) -> dict:
    """A `prune`-shaped report of the final model (per-block, per-linear measured sparsity), so that
    `save_pruned` writes the usual `sparsity_config.json` and `sparsellm report` reads the run. The
    calibration (with its token hash) is the driver's `report`'s; for an already-pruned input, the method,
    pattern and allocation (name, per-block rates) are the input's, marked `kept_from_input`."""
    last = report["steps"][-1] if report["steps"] else {}
    L = len(get_blocks(model))
    inp = report.get("input") or {}
    kept = bool(inp.get("kept"))
    targets = list(inp["allocation"]["rates"]) if kept else last.get("rates", [config.sparsity_ratio] * L)
    pr = report.get("prune") or {}  # the baselines' one prune
    pb = pr.get("blocks")
    blocks = []
    for i, block in enumerate(get_blocks(model)):
        linears = block_linears(model, block)
        mods = {n: {"target": targets[i], "measured": float((lin.weight == 0).sum()) / lin.weight.numel()}
                for n, lin in linears.items()}
        total = sum(lin.weight.numel() for lin in linears.values())
        measured = sum(mods[n]["measured"] * lin.weight.numel() for n, lin in linears.items()) / total
        rel = last["rel_errors"][i] if "rel_errors" in last else (pb[i]["rel_error"] if pb else None)
        blocks.append({"block": i, "target": targets[i], "measured": measured, "rel_error": rel, "cum_error": None,
                       "seconds": pb[i]["seconds"] if pb else 0.0, "modules": mods})
    steps = report["steps"]
    prune_s = sum(st.get("prune_seconds") or 0.0 for st in steps) + (pr.get("prune_seconds") or 0.0)
    pc = config.prune
    if kept:
        allocation = {**inp["allocation"], "kept_from_input": True}
    else:
        allocation = {"name": "rmi" if "rates" in last else "uniform", "rates": targets,
                      "seconds": sum(st.get("rmi_seconds") or 0.0 for st in steps)}
    calibration = dict(report["calibration"])
    if pr:
        calibration["used"] = pr["calibration"]["used"]
    return {
        "method": f"{inp['method'] if kept else pc.prune_method}+{config.method}",
        "sparsity_type": inp["sparsity_type"] if kept else pc.sparsity_type,
        "target_sparsity": pc.sparsity_ratio, "allocation": allocation, "calibration": calibration,
        "options": pc.options(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "measured": linear_sparsity(model), "blocks": blocks, "prune_seconds": prune_s,
        "peak_rss_mib": report["peak_rss_mib"], "threads": torch.get_num_threads(), "versions": api.versions(),
    }


__all__ = ["Job", "finetune", "prune_like_report"]
