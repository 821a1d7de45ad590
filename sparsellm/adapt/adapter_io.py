"""Masked-LoRA adapters on disk in peft's layout (`adapter_config.json` written by peft's `LoraConfig`,
`adapter_model.safetensors` with peft's key names), plus `sparsellm_adapter.json` for what peft has no
field for: the product is masked by the base weight's support, and the factors are already merged.

A block with active rank r_l is stored with factors of rank r_l (peft's `rank_pattern`) and
`alpha_pattern` α·r_l/r, so peft's scaling α_l/r_l equals LoSA's α/r. peft itself applies B·A unmasked:
to use the adapter as trained, load it with `load_adapter` (or use the merged model, which already holds it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from .masked_lora import MaskedLoraLinear, add_masked_lora

PREFIX = "base_model.model."


def save_adapter(model, path, base_model: str | None = None) -> None:
    """Write the adapters of `model` (MaskedLoraLinear layers) to directory `path` in peft's layout."""
    from peft import LoraConfig

    layers = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLoraLinear)}
    if not layers:
        raise UsageError("the model has no masked LoRA adapters")
    first = next(iter(layers.values()))
    tensors, ranks, alphas = {}, {}, {}
    for n, m in layers.items():
        r = m.rank
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A[:r].detach().contiguous().cpu()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B[:, :r].detach().contiguous().cpu()
        ranks[n], alphas[n] = r, m.scaling * r
    cfg = LoraConfig(r=first.r, lora_alpha=first.scaling * first.r, lora_dropout=float(getattr(first.dropout, "p", 0.0)),
                     target_modules=sorted({n.rsplit(".", 1)[-1] for n in layers}), bias="none",
                     task_type="CAUSAL_LM", rank_pattern=ranks, alpha_pattern=alphas,
                     base_model_name_or_path=base_model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "sparsellm_adapter.json").write_text(json.dumps({
        "masked": True, "merged_into_base": all(m.merged for m in layers.values()), "r": first.r,
        "r_max": first.r_max, "note": "ΔW = (B @ A) ⊙ (W != 0); peft applies B @ A unmasked"}, indent=2) + "\n")


def load_adapter(model, path) -> list[MaskedLoraLinear]:
    """Wrap `model`'s block linears with the adapters saved at `path` (by `save_adapter`). When the
    adapter was saved merged (the usual case: `model` is the merged sparse model), the layers come back
    merged, so `unmerge(model)` recovers the sparse base. The mask is the support of the current weights.
    Raises UsageError for a missing or mismatching adapter."""
    from peft import LoraConfig

    path = Path(path)
    if not (path / "adapter_model.safetensors").is_file() or not (path / "sparsellm_adapter.json").is_file():
        raise UsageError(f"no sparsellm masked-LoRA adapter at {path}")
    cfg = LoraConfig.from_pretrained(str(path))
    meta = json.loads((path / "sparsellm_adapter.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    layers = add_masked_lora(model, r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, r_max=meta["r_max"],
                             targets=None)
    names = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLoraLinear)}
    with torch.no_grad():
        for n, m in names.items():
            key = f"{PREFIX}{n}.lora_A.weight"
            if key not in tensors:
                raise UsageError(f"adapter at {path} has no factors for {n}")
            A, B = tensors[key], tensors[f"{PREFIX}{n}.lora_B.weight"]
            r = A.shape[0]
            if A.shape[1] != m.lora_A.shape[1] or B.shape[0] != m.lora_B.shape[0] or r > m.r_max:
                raise UsageError(f"adapter factors for {n} do not fit the model")
            m.lora_A.zero_()
            m.lora_B.zero_()
            m.lora_A[:r] = A.to(m.lora_A.dtype)
            m.lora_B[:, :r] = B.to(m.lora_B.dtype)
            m.set_rank(r)
            m.merged = bool(meta["merged_into_base"])
    return layers
