"""LoSA's checkpoints: after every step, the adapters' full state (merged base weights, factors, masks),
the ranks, the RNG state and the report so far, written atomically; a run resumes from one only when its
settings key (every setting, the step evaluation's window length, the input model and a hash of the
fine-tuning data) is the checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from ..provenance import tokens_sha256
from .masked_lora import MaskedLoraLinear, set_ranks


def settings_key(config, model_id: str, data_sha: str, eval_seqlen: int | None = None) -> dict:
    """What a checkpoint must share with a run that resumes it: the flat settings of `config` (a
    FinetuneConfig) with the step evaluation's window length, the input model's id and the data's hash."""
    return {"config": {**config.to_dict(), "eval_seqlen": eval_seqlen}, "model": model_id, "data_sha256": data_sha}


def examples_sha(examples) -> str:
    """SHA-256 of the fine-tuning examples' tokens and labels (each example's input_ids, then its labels)."""
    return tokens_sha256(t for example in examples for t in example)


def save_checkpoint(path: Path, model, state: dict) -> None:
    """The adapters' full state (merged base weights, factors, masks, ranks) and the run so far, written
    atomically: a temporary directory renamed over the previous checkpoint."""
    from ..outputs import atomic_dir_write

    tensors, device = {}, torch.device("cpu")
    for n, m in model.named_modules():
        if isinstance(m, MaskedLoraLinear):
            tensors[f"{n}.base.weight"] = m.base.weight.detach().contiguous().cpu()
            tensors[f"{n}.lora_A"] = m.lora_A.detach().contiguous().cpu()
            tensors[f"{n}.lora_B"] = m.lora_B.detach().contiguous().cpu()
            tensors[f"{n}.mask"] = m.mask.contiguous().cpu()
            device = m.base.weight.device
    tensors["rng_state"] = torch.get_rng_state()
    if device.type == "cuda":  # dropout on the GPU draws from its own generator
        tensors["cuda_rng_state"] = torch.cuda.get_rng_state(device)

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
    device = torch.device("cpu")
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, MaskedLoraLinear):
                m.base.weight.copy_(tensors[f"{n}.base.weight"])
                m.lora_A.copy_(tensors[f"{n}.lora_A"])
                m.lora_B.copy_(tensors[f"{n}.lora_B"])
                m.mask = tensors[f"{n}.mask"].to(m.base.weight.device)
                m.merged = True
                device = m.base.weight.device
    set_ranks(model, state["ranks"])
    torch.set_rng_state(tensors["rng_state"])
    if device.type == "cuda" and "cuda_rng_state" in tensors:
        torch.cuda.set_rng_state(tensors["cuda_rng_state"], device)
    return state


__all__ = ["settings_key", "examples_sha", "save_checkpoint", "load_checkpoint"]
