"""LoSA's dynamic loop and its baselines, one entry point: config in, model changed in place, report out
(Huang et al., "Dynamic Low-Rank Sparse Adaptation for LLMs", ICLR 2025, §3; algorithms.md §8.4).

    Y_i = the input model's block outputs on the first `rank_nsamples` calibration windows (stored once)
    for t = 1..T:   s_t = S − S(1 − t/T)³
        merge the masked adapters into W
        x = RMI rates at s_t on the current model; re-prune W with Wanda/SparseGPT at x, recording
            e_i = Σ((Y_i − Ŷ_i) / ν_i)² / hidden       (Ŷ_i: pruned model's block output; ν_i: per-unit ‖Y_i‖)
        unmerge with the new mask (pruned positions stay zero; SparseGPT's weight updates are kept)
        ranks ∝ e_i with mean r̄_t (rank_start → rank_end), each in [1, r_max]
        fine-tune the adapters on data slice t (the slices partition the data: none is used twice)
    merge: a plain model exactly as sparse as the last masks

Baselines on the same data (so the same number of fine-tuning tokens), in one pass:
    none         prune at S (uniform), no fine-tuning
    lora         prune at S, plain LoRA (peft), merged: the model becomes dense again, and the report says how much
    masked-lora  prune at S, masked LoRA of uniform rank r (static: no schedule)
A model that is already at least S sparse is not pruned again by the baselines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import pipeline as api
from ..allocate import resolve_allocation
from ..data import calibration_windows
from ..engine import auto_batch_size, capture_inputs, linear_sparsity, prune_blocks, run_block
from ..errors import UsageError
from ..evaluate.perplexity import eval_tokens, perplexity
from ..models import block_linears, context_length, get_blocks
from ..prune import parse_pattern
from .adapter_io import save_adapter
from .masked_lora import (MaskedLoraLinear, add_masked_lora, adapter_ranks, lora_layers, merge, remove_adapters,
                          set_ranks, unmerge, unwrapped)
from .schedule import allocate_ranks, cubic_schedule
from .train import train

log = logging.getLogger("sparsellm")

METHODS = ("none", "lora", "masked-lora", "losa")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run.

    method: "losa", "masked-lora", "lora" or "none" (see the module docstring).
    sparsity_ratio S in [0, 1) and sparsity_type ("unstructured" or N:M; LoSA needs unstructured);
    prune_method: "wanda" or "sparsegpt" (or "magnitude"), on nsamples × seqlen calibration windows of
        calib_dataset drawn with seed; blocksize / percdamp as for `prune`.
    steps: LoSA's T; rmi_nsamples: windows for RMI's CKA at every step; rank_nsamples: windows whose
        block outputs are stored for the rank allocation (memory: L × rank_nsamples × seqlen × hidden).
    lora_r, lora_alpha, lora_dropout: the adapter (scaling α/r); r_max: size of the factors, the largest
        rank; rank_start → rank_end: LoSA's mean rank r̄_t over the steps (paper: 6 → 10).
    examples: fine-tuning data, a list of (input_ids (T,), labels (T,)) — see adapt.train; the token budget.
    lr, batch_size, grad_accum, warmup_ratio, weight_decay, max_grad_norm, gradient_checkpointing: the
        optimiser loop (reference: 2e-4, 4, 2, 0.3, 0.001, 0.3); each LoSA step starts a fresh schedule.
    step_eval_windows: WikiText-2 windows of eval_seqlen tokens scored after each step (0: none)."""

    method: str = "losa"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    prune_method: str = "wanda"
    steps: int = 5
    nsamples: int = 128
    seqlen: int = 2048
    calib_dataset: str = "c4"
    seed: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int | None = None
    rmi_nsamples: int = 64
    rank_nsamples: int = 8
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    r_max: int = 16
    rank_start: float = 6.0
    rank_end: float = 10.0
    lr: float = 2e-4
    ft_batch_size: int = 4
    grad_accum: int = 2
    warmup_ratio: float = 0.3
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    gradient_checkpointing: bool = False
    step_eval_windows: int = 4
    eval_seqlen: int = 2048

    def validate(self) -> "FinetuneConfig":
        """Checks that need no model. Raises UsageError."""
        if self.method not in METHODS:
            raise UsageError(f"unknown fine-tuning method {self.method!r}; choose from {', '.join(METHODS)}")
        nm = parse_pattern(self.sparsity_type)
        if nm is not None and self.method == "losa":
            raise UsageError("LoSA ramps an unstructured sparsity over its steps; for an N:M pattern use "
                             "--method masked-lora (the mask of a re-pruned N:M model never changes)")
        self.prune_config(self.sparsity_ratio if nm is None else None).validate()
        if nm is not None:
            self.sparsity_ratio = nm.sparsity
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if not 1 <= self.lora_r <= self.r_max:
            raise UsageError(f"LoRA rank must satisfy 1 <= r <= r_max, got r={self.lora_r}, r_max={self.r_max}")
        for name in ("rank_start", "rank_end"):
            if not 1 <= getattr(self, name) <= self.r_max:
                raise UsageError(f"--{name} must be in [1, r_max = {self.r_max}], got {getattr(self, name)}")
        if self.rank_nsamples < 1 or self.step_eval_windows < 0 or self.eval_seqlen < 2:
            raise UsageError("--rank_nsamples must be >= 1, --step_eval_windows >= 0 and --eval_seqlen >= 2")
        import math

        if not all(math.isfinite(float(v)) for v in (self.lr, self.lora_alpha, self.weight_decay, self.max_grad_norm)):
            raise UsageError("--lr, --lora_alpha, --weight_decay and --max_grad_norm must be finite numbers")
        if not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0:
            raise UsageError("--lora_dropout must be in [0, 1) and --lora_alpha > 0")
        if self.lr <= 0 or self.ft_batch_size < 1 or self.grad_accum < 1 or not 0 <= self.warmup_ratio < 1 \
                or self.max_grad_norm <= 0 or self.weight_decay < 0:
            raise UsageError("--lr and --max_grad_norm must be > 0, --ft_batch_size and --grad_accum >= 1, "
                             "--warmup_ratio in [0, 1), --weight_decay >= 0")
        return self

    def prune_config(self, rate: float | None, allocation: str = "uniform") -> api.PruneConfig:
        extra = {"rmi_nsamples": self.rmi_nsamples} if allocation == "rmi" else {}
        options = {"blocksize": self.blocksize, "percdamp": self.percdamp} if self.prune_method == "sparsegpt" else {}
        return api.PruneConfig.from_flat(prune_method=self.prune_method, sparsity_ratio=rate,
                                         sparsity_type=self.sparsity_type, nsamples=self.nsamples, seqlen=self.seqlen,
                                         calib_dataset=self.calib_dataset, seed=self.seed, allocation=allocation,
                                         batch_size=self.batch_size, diag_nsamples=0, **options, **extra)

    def mean_rank(self, t: int) -> float:
        """r̄_t for step t = 1..T, linear from rank_start to rank_end (T = 1: rank_end)."""
        if self.steps == 1:
            return self.rank_end
        return self.rank_start + (self.rank_end - self.rank_start) * (t - 1) / (self.steps - 1)


def data_slices(n: int, steps: int) -> list[tuple[int, int]]:
    """Partition range(n) into `steps` consecutive slices of (nearly) equal size. Raises UsageError if n < steps."""
    if n < steps:
        raise UsageError(f"{n} fine-tuning examples cannot give each of {steps} steps its own slice")
    return [(n * t // steps, n * (t + 1) // steps) for t in range(steps)]


@torch.no_grad()
def dense_outputs(model, ids: torch.Tensor, batch_size: int | None = None) -> list[torch.Tensor]:
    """Every block's outputs on `ids` (k, seqlen), from the model as it is now: L tensors (k, seqlen, hidden)."""
    X, kwargs = capture_inputs(model, ids)
    Y = torch.empty_like(X)
    outs = []
    for i, block in enumerate(get_blocks(model)):
        run_block(block, X, kwargs[i], Y, batch_size or auto_batch_size(X.shape[1]))
        outs.append(Y.clone())
        X, Y = Y, X
    return outs


def normalised_error(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """LoSA's per-block error (§8.3): Σ over tokens and units of ((Y − Ŷ) / ν)² / hidden, where ν (hidden,)
    is the L2 norm of each hidden unit of the dense output Y over all tokens. Shapes (k, seqlen, hidden)."""
    Y = dense.float().reshape(-1, dense.shape[-1])
    nu = Y.norm(dim=0).clamp_min(1e-12)
    return float((((Y - pruned.float().reshape(Y.shape)) / nu) ** 2).sum()) / Y.shape[1]


def settings_key(config: FinetuneConfig, model_id: str, data_sha: str) -> dict:
    """What a checkpoint must share with a run that resumes it."""
    return {"config": asdict(config), "model": model_id, "data_sha256": data_sha}


def examples_sha(examples) -> str:
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(ids.numpy().tobytes())
        h.update(labels.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, state: dict) -> None:
    """The adapters' full state (merged base weights, factors, masks, ranks) and the run so far, written
    atomically: a temporary directory renamed over the previous checkpoint."""
    from ..outputs import atomic_dir_write

    tensors = {}
    for n, m in model.named_modules():
        if isinstance(m, MaskedLoraLinear):
            tensors[f"{n}.base.weight"] = m.base.weight.detach().contiguous()
            tensors[f"{n}.lora_A"] = m.lora_A.detach().contiguous()
            tensors[f"{n}.lora_B"] = m.lora_B.detach().contiguous()
            tensors[f"{n}.mask"] = m.mask.contiguous()
    tensors["rng_state"] = torch.get_rng_state()

    def write(tmp: Path):
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    atomic_dir_write(path, write)


def load_checkpoint(path: Path, model, key: dict) -> dict:
    """Restore what `save_checkpoint` wrote into `model` (already wrapped with adapters) and return the
    state. Raises UsageError if there is no checkpoint or it was made with other settings."""
    f = path / "state.json"
    if not f.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        state = json.loads(f.read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (ValueError, OSError) as e:
        raise UsageError(f"--resume: the checkpoint at {path} is unreadable ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise UsageError(f"--resume: the checkpoint at {path} is unreadable")
    if state.get("key") != key:
        old = state.get("key", {})
        diff = sorted(k for k in set(old.get("config", {})) | set(key["config"])
                      if old.get("config", {}).get(k) != key["config"].get(k))
        diff += [k for k in ("model", "data_sha256") if old.get(k) != key[k]]
        raise UsageError(f"--resume: the checkpoint at {path} was made with other settings ({', '.join(diff)})")
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, MaskedLoraLinear):
                m.base.weight.copy_(tensors[f"{n}.base.weight"])
                m.lora_A.copy_(tensors[f"{n}.lora_A"])
                m.lora_B.copy_(tensors[f"{n}.lora_B"])
                m.mask = tensors[f"{n}.mask"].to(m.base.weight.device)
                m.merged = True
    set_ranks(model, state["ranks"])
    torch.set_rng_state(tensors["rng_state"])
    return state


# ------------------------------------------------------------------------------------------------ the methods


def _prune_to(model, tok, config: FinetuneConfig, calib, progress) -> dict | None:
    """Prune at S with uniform rates unless the model already is that sparse. Returns the prune report or None."""
    S = config.sparsity_ratio  # validate() set it from an N:M pattern
    have = linear_sparsity(model)["sparsity"]
    if have >= S - 1e-4:
        log.info("the model is already %.4f sparse (target %.4f): not pruned again", have, S)
        return None
    pc = config.prune_config(None if config.sparsity_type != "unstructured" else S)
    return api.prune(model, tok, pc, calib_ids=calib, progress=progress)


def _eval(model, tok, config, wiki_ids, progress) -> dict | None:
    if not config.step_eval_windows:
        return None
    return perplexity(model, tok, "wikitext2", config.eval_seqlen, config.step_eval_windows, progress=progress,
                      ids=wiki_ids)


def _train(model, examples, config, progress, pad_id) -> dict:
    out = train(model, examples, lr=config.lr, batch_size=config.ft_batch_size, grad_accum=config.grad_accum,
                warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
                max_grad_norm=config.max_grad_norm, gradient_checkpointing=config.gradient_checkpointing,
                pad_id=pad_id, progress=progress)
    out.pop("optimizer")
    out["examples"] = len(examples)
    return out


def finetune(model, tokenizer, config: FinetuneConfig, examples: list, checkpoint_dir=None, resume: bool = False,
             model_id: str = "", adapter_dir=None, progress: bool = True) -> dict:
    """Run `config.method` on `model`, changed in place, and return the report. On return `model` is a plain
    transformers model again: the adapters are merged and removed (for "lora" by peft's merge_and_unload).
    adapter_dir: if given, the trained adapter is written there first, in peft's layout (`adapter_io`).

    examples: fine-tuning data, list of (input_ids (T,), labels (T,)); every method sees all of it once.
    checkpoint_dir: LoSA writes a checkpoint there after every step; with `resume`, it continues from it
    (the settings, input model id and data must match). Raises UsageError for bad settings or data."""
    config.validate()
    if not examples:
        raise UsageError("no fine-tuning examples")
    seqlen = api.validate_for_model(model, config.prune_config(
        config.sparsity_ratio if config.sparsity_type == "unstructured" else None).validate())
    config.eval_seqlen = min(config.eval_seqlen, context_length(model))
    if config.method == "losa":
        data_slices(len(examples), config.steps)
    if resume and (config.method != "losa" or checkpoint_dir is None):
        raise UsageError("--resume continues a LoSA run from its checkpoint directory")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    torch.manual_seed(config.seed)  # LoRA factor init and dropout: a run is reproducible (resume restores the state)
    t_start = time.perf_counter()
    calib = calibration_windows(tokenizer, config.calib_dataset, config.nsamples, seqlen, config.seed)
    wiki_ids = eval_tokens(tokenizer, "wikitext2", config.eval_seqlen) if config.step_eval_windows else None
    report = {"method": config.method, "target_sparsity": config.sparsity_ratio,
              "tokens_budget": int(sum(int((y != -100).sum()) for _, y in examples)),
              "examples": len(examples), "steps": []}
    if config.method == "losa":
        _losa(model, tokenizer, config, examples, calib, wiki_ids, checkpoint_dir, resume, model_id, progress,
              pad_id, report)
    else:
        report["prune"] = _prune_to(model, tokenizer, config, calib, progress)
        if config.method == "lora":
            import warnings

            from peft import LoraConfig, get_peft_model

            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")  # peft 0.21 on transformers 5

            names = {n.rsplit(".", 1)[-1] for n in block_linears(model, get_blocks(model)[0])}
            peft_model = get_peft_model(model, LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                target_modules=sorted(names), task_type="CAUSAL_LM"))
            report["train"] = _train(peft_model, examples, config, progress, pad_id)
            if adapter_dir is not None:
                peft_model.save_pretrained(str(adapter_dir))
            if peft_model.merge_and_unload() is not model:
                raise RuntimeError("peft's merge_and_unload did not return the model it wrapped")
        elif config.method == "masked-lora":
            add_masked_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.r_max)
            set_ranks(model, [config.lora_r] * len(get_blocks(model)))
            report["train"] = _train(model, examples, config, progress, pad_id)
            merge(model)
        report["steps"].append({"step": 1, "target": config.sparsity_ratio, "ppl": _eval(model, tokenizer, config,
                                                                                          wiki_ids, progress)})
    if lora_layers(model):
        report["ranks"] = adapter_ranks(model)
        if adapter_dir is not None:
            save_adapter(model, adapter_dir, model_id or None)
        remove_adapters(model)
    report["measured"] = linear_sparsity(model)
    report["seconds"] = time.perf_counter() - t_start
    report["peak_rss_mib"] = api.peak_rss_mib()
    return report


def _losa(model, tok, config, examples, calib, wiki_ids, checkpoint_dir, resume, model_id, progress, pad_id,
          report) -> None:
    L = len(get_blocks(model))
    k = min(config.rank_nsamples, calib.shape[0])
    t0 = time.perf_counter()
    dense = dense_outputs(model, calib[:k], config.batch_size)  # the input model's, before any step
    report["dense_outputs_seconds"] = time.perf_counter() - t0
    add_masked_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.r_max)
    set_ranks(model, [config.lora_r] * L)
    key = settings_key(config, model_id, examples_sha(examples))
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        state = load_checkpoint(ckpt, model, key)
        start, report["steps"] = state["step"], state["steps"]
        log.info("resumed after step %d of %d from %s", start, config.steps, ckpt)
    schedule = cubic_schedule(config.sparsity_ratio, config.steps)
    slices = data_slices(len(examples), config.steps)
    for t in range(start + 1, config.steps + 1):
        s_t = schedule[t - 1]
        entry = {"step": t, "target": s_t}
        merge(model)
        pc = config.prune_config(s_t, "rmi")
        errors = [0.0] * L

        def record(i, X):
            errors[i] = normalised_error(dense[i], X[:k])

        with unwrapped(model):
            rates, alloc = resolve_allocation(model, pc, calib, progress)
            t1 = time.perf_counter()
            blocks = prune_blocks(model, calib, config.prune_method, rates, None,
                                  options={"blocksize": config.blocksize, "percdamp": config.percdamp},
                                  batch_size=config.batch_size, progress=progress, on_block_end=record)
            pruned = linear_sparsity(model)["sparsity"]
        for m in lora_layers(model):
            m.refresh_mask()
        unmerge(model)
        ranks = allocate_ranks(errors, config.mean_rank(t), config.r_max)
        set_ranks(model, ranks)
        entry.update(rates=alloc["rates"], rmi_seconds=alloc["seconds"], prune_seconds=time.perf_counter() - t1,
                     errors=errors, rel_errors=[b["rel_error"] for b in blocks], mean_rank=config.mean_rank(t),
                     ranks=ranks, pruned_sparsity=pruned)
        a, b = slices[t - 1]
        entry["data_slice"] = [a, b]
        entry["train"] = _train(model, examples[a:b], config, progress, pad_id)
        merge(model)
        with unwrapped(model):
            entry["measured"] = linear_sparsity(model)["sparsity"]
        entry["ppl"] = _eval(model, tok, config, wiki_ids, progress)
        report["steps"].append(entry)
        if ckpt is not None:
            save_checkpoint(ckpt, model, {"key": key, "step": t, "ranks": adapter_ranks(model),
                                          "steps": report["steps"]})
        log.info("LoSA step %d/%d: target %.4f, measured %.4f, mean rank %.1f, train loss %.4f → %.4f%s", t,
                 config.steps, s_t, entry["measured"], entry["mean_rank"], entry["train"]["losses"][0],
                 entry["train"]["losses"][-1], f", ppl {entry['ppl']['ppl']:.3f}" if entry["ppl"] else "")


def prune_like_report(model, config: FinetuneConfig, report: dict, calib_seqlen: int) -> dict:
    """A `prune`-shaped report of the final model (per-block, per-linear measured sparsity), so that
    `save_pruned` writes the usual `sparsity_config.json` and `sparsellm report` reads the run."""
    last = report["steps"][-1] if report["steps"] else {}
    L = len(get_blocks(model))
    targets = last.get("rates", [config.sparsity_ratio] * L)
    pb = (report.get("prune") or {}).get("blocks")  # the baselines' one prune
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
    rates = targets
    steps = report["steps"]
    prune_s = sum(st.get("prune_seconds") or 0.0 for st in steps) + ((report.get("prune") or {}).get("prune_seconds") or 0.0)
    return {
        "method": f"{config.prune_method}+{config.method}", "sparsity_type": config.sparsity_type,
        "target_sparsity": config.sparsity_ratio,
        "allocation": {"name": "rmi" if config.method == "losa" else "uniform", "rates": rates,
                       "seconds": sum(st.get("rmi_seconds") or 0.0 for st in steps)},
        "calibration": {"dataset": config.calib_dataset, "nsamples": config.nsamples, "seqlen": calib_seqlen,
                        "seed": config.seed, "used": True},
        "options": {"blocksize": config.blocksize, "percdamp": config.percdamp},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "measured": linear_sparsity(model), "blocks": blocks, "prune_seconds": prune_s,
        "peak_rss_mib": report["peak_rss_mib"], "threads": torch.get_num_threads(), "versions": api.versions(),
    }


__all__ = ["FinetuneConfig", "METHODS", "finetune", "data_slices", "normalised_error", "dense_outputs",
           "prune_like_report", "save_checkpoint", "load_checkpoint"]
