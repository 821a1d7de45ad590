"""Saving and loading structurally pruned models, whose blocks may each have their own widths.

A vanilla config cannot express per-block widths, so the directory holds:

    model.safetensors    the weights at their real shapes (save_pretrained; never a pickled module)
    config.json          the dense model's config, or — when every block has the same widths and the
                         family's config can express every bias — a plain config at the new widths that
                         vanilla transformers loads
    structure.json       per-block num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
                         and whether vanilla transformers can load the directory

`load_structured(dir)` (used by `models.load_model` whenever structure.json is present) builds the model
from config.json, replaces every block's projections by linears of the recorded shapes (a bias wherever
the checkpoint has one) and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..models import get_blocks
from .shrink import block_structure, struct_spec

STRUCTURE = "structure.json"


def structure(model) -> list[dict]:
    return [block_structure(model, b) for b in get_blocks(model)]


def vanilla_config(model):
    """A config at the pruned widths that vanilla transformers loads, or (None, reason)."""
    blocks = structure(model)
    if any(b != blocks[0] for b in blocks):
        return None, "the blocks have different widths"
    spec = struct_spec(model)
    cfg = copy.deepcopy(model.config)
    b0 = get_blocks(model)[0]
    biases = {n: b0.get_submodule(n).bias is not None for n in (spec.q, spec.k, spec.v, spec.o, *spec.up, spec.down)}
    base = type(cfg)()  # the family's defaults say which biases a vanilla model has
    for group, names, flag in (("attention", (spec.q, spec.k, spec.v, spec.o), "attention_bias"),
                               ("mlp", (*spec.up, spec.down), "mlp_bias")):
        have = [biases[n] for n in names]
        if any(have):
            if not hasattr(base, flag):
                if cfg.model_type == "qwen2" and group == "attention" and have == [True, True, True, False]:
                    continue  # Qwen2's own q/k/v biases
                return None, f"{cfg.model_type}'s config cannot express {group} biases"
            setattr(cfg, flag, True)
    cfg.num_attention_heads = blocks[0]["num_attention_heads"]
    cfg.num_key_value_heads = blocks[0]["num_key_value_heads"]
    cfg.head_dim = blocks[0]["head_dim"]
    cfg.intermediate_size = blocks[0]["intermediate_size"]
    return cfg, None


@torch.no_grad()
def _materialise_biases(model, cfg) -> None:
    """With attention_bias / mlp_bias set for a vanilla config, every projection of that group needs a
    bias tensor: add zeros where there is none (the outputs do not change)."""
    spec = struct_spec(model)
    groups = []
    if getattr(cfg, "attention_bias", False):
        groups += [spec.q, spec.k, spec.v, spec.o]
    if getattr(cfg, "mlp_bias", False):
        groups += [*spec.up, spec.down]
    for block in get_blocks(model):
        for n in groups:
            lin = block.get_submodule(n)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))


def write_structured(model, tmp: Path, extra: dict | None = None) -> dict:
    """Write the weights, config.json and structure.json into directory `tmp` (the caller's atomic write).
    Returns the structure.json content."""
    cfg, why = vanilla_config(model)
    if cfg is not None:
        _materialise_biases(model, cfg)
    model.save_pretrained(tmp)
    if cfg is not None:
        cfg.save_pretrained(tmp)
    info = {"format": "sparsellm-structured", "model_type": model.config.model_type, "blocks": structure(model),
            "vanilla_loadable": cfg is not None, "why_not_vanilla": why, **(extra or {})}
    (Path(tmp) / STRUCTURE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def load_structured(path, dtype=torch.float32):
    """Build the model saved by `write_structured` at `path`. Raises UsageError for a malformed directory."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        info = json.loads((path / STRUCTURE).read_text())
        blocks = info["blocks"]
        config = AutoConfig.from_pretrained(path)
        files = sorted(path.glob("*.safetensors"))
        keys = set()
        for f in files:
            with safe_open(str(f), "pt") as fh:
                keys |= set(fh.keys())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a readable structured model: {e}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = struct_spec(model)
    layers = get_blocks(model)
    if len(blocks) != len(layers):
        raise UsageError(f"{path}/{STRUCTURE} lists {len(blocks)} blocks, the config has {len(layers)}")
    prefix = {id(b): n for n, b in model.named_modules()}
    hidden = model.config.hidden_size
    hd0 = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for block, b in zip(layers, blocks):
        q, kv, hd, inter = b["num_attention_heads"], b["num_key_value_heads"], b["head_dim"], b["intermediate_size"]
        if hd != hd0 or not (isinstance(q, int) and isinstance(kv, int) and kv >= 1 and q >= kv and q % kv == 0):
            raise UsageError(f"{path}/{STRUCTURE}: block widths are inconsistent (heads {q}, KV heads {kv}, "
                             f"head_dim {hd}; the model's head_dim is {hd0})")
        shapes = {spec.q: (hidden, q * hd), spec.k: (hidden, kv * hd), spec.v: (hidden, kv * hd),
                  spec.o: (q * hd, hidden), spec.down: (inter, hidden), **{n: (hidden, inter) for n in spec.up}}
        for name, (fan_in, fan_out) in shapes.items():
            has_bias = f"{prefix[id(block)]}.{name}.bias" in keys
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, nn.Linear(fan_in, fan_out, bias=has_bias, dtype=dtype))
        attn = block.get_submodule(spec.attn)
        attn.head_dim = hd
        attn.num_key_value_groups = q // kv
    from safetensors.torch import load_file

    state = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UsageError(f"{path}: weights do not match {STRUCTURE}: {str(e).splitlines()[-1].strip()}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UsageError(f"{path}: weights do not match {STRUCTURE} (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()
