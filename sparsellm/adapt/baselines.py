"""LoSA's baselines on the same data (so the same number of fine-tuning tokens), each one pass:

    none         prune at S (uniform), no fine-tuning
    lora         prune at S, plain LoRA (peft), merged: the model becomes dense again, and the report says how much
    masked-lora  prune at S, masked LoRA of uniform rank r (static: no schedule)

An already-pruned input (`pruned_input.py`) is not pruned again: its masks and per-block rates are kept.
Every merge is measured against the adapted model (`Job.merge_checked`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import pipeline as api
from ..config import setting
from ..errors import UsageError
from ..models import block_linears, get_blocks
from ..registry import NoConfig, register


@dataclass
class MaskedLoRAConfig:
    """Masked LoRA's factor size r_max (the largest rank a block can get; the active rank is r)."""

    r_max: int = setting(16, "LoSA: largest per-block rank (size of the factors)")

    def validate(self, config) -> "MaskedLoRAConfig":
        """Checks against the whole FinetuneConfig `config`: 1 <= r <= r_max. Raises UsageError."""
        r = config.lora.lora_r
        if not 1 <= r <= self.r_max:
            raise UsageError(f"LoRA rank must satisfy 1 <= r <= r_max, got r={r}, r_max={self.r_max}")
        return self


def prune_to(job) -> dict | None:
    """Prune at S with uniform rates unless the input is already pruned (then its masks are kept). Returns
    the prune report or None."""
    if job.pruned_input is not None:
        return None
    return api.prune(job.model, job.tokenizer, job.config.prune, calib_ids=job.calib, progress=job.progress)


def _one_step(job) -> None:
    job.report["steps"].append({"step": 1, "target": job.config.sparsity_ratio, "ppl": job.evaluate()})


@register("finetune", "none", NoConfig)
def none(job) -> None:
    """prune at S (uniform), no fine-tuning"""
    job.report["prune"] = prune_to(job)
    _one_step(job)


@register("finetune", "lora", NoConfig)
def lora(job) -> None:
    """prune at S, plain LoRA (peft), merged: the model becomes dense again"""
    import warnings

    from peft import LoraConfig, get_peft_model

    # peft 0.21 on transformers 5
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
    job.report["prune"] = prune_to(job)
    model, lc = job.model, job.config.lora
    names = {n.rsplit(".", 1)[-1] for n in block_linears(model, get_blocks(model)[0])}
    peft_model = get_peft_model(model, LoraConfig(r=lc.lora_r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                                                  bias="none", target_modules=sorted(names), task_type="CAUSAL_LM"))
    job.report["train"] = job.train(peft_model, job.examples)
    if job.adapter_dir is not None:
        peft_model.save_pretrained(str(job.adapter_dir))
    unloaded = []
    job.merge_checked(lambda: unloaded.append(peft_model.merge_and_unload()))
    if unloaded[0] is not model:
        raise RuntimeError("peft's merge_and_unload did not return the model it wrapped")
    _one_step(job)


@register("finetune", "masked-lora", MaskedLoRAConfig)
def masked_lora(job) -> None:
    """prune at S, masked LoRA of uniform rank r (static: no schedule)"""
    from .masked_lora import add_masked_lora, merge, set_ranks  # imports torch

    job.report["prune"] = prune_to(job)
    model, lc = job.model, job.config.lora
    add_masked_lora(model, lc.lora_r, lc.lora_alpha, lc.lora_dropout, job.config.method_config.r_max)
    set_ranks(model, [lc.lora_r] * len(get_blocks(model)))
    job.report["train"] = job.train(model, job.examples)
    job.merge_checked(lambda: merge(model))
    _one_step(job)


__all__ = ["MaskedLoRAConfig", "prune_to", "none", "lora", "masked_lora"]
