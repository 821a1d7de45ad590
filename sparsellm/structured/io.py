"""Saving and loading structurally pruned models, whose blocks may each have their own widths.

A vanilla config cannot express per-block widths, so the directory holds:

    model.safetensors    the weights at their real shapes (save_pretrained; never a pickled module)
    config.json          the dense model's config, or — when every block has the same widths and the
                         family's config can express them (every bias, the head count with an explicit
                         head_dim; `vanilla_config`) — a plain config at the new widths that vanilla
                         transformers loads. It declares the saved dtype.
    structure.json       per-block num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
                         and whether vanilla transformers can load the directory

Loading such a directory is `sparsellm.models.load_structured` (which `load_model` uses whenever
structure.json is present): loading lives with the other loaders, so `models` never imports `structured`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path


from ..lazy import lazy_import, no_grad
from ..models import STRUCTURE  # the file name load_structured reads
from ..models.arch import get_blocks, struct_spec
from ..models.save import reference_shapes, save_model
from .shrink import block_structure

torch = lazy_import("torch")
nn = lazy_import("torch.nn")


def structure(model) -> list[dict]:
    """Per-block widths of `model` (one `block_structure` dict per decoder block)."""
    return [block_structure(model, b) for b in get_blocks(model)]


def vanilla_config(model):
    """A config at the pruned widths that vanilla transformers loads, or (None, reason). It exists when
    every block has the same widths, the family's config can express every bias, the family's config
    class accepts the widths (transformers' own validation: LlamaConfig and Gemma3's want the hidden size
    a multiple of the head count, even with an explicit head_dim) and a model built from it has exactly
    the pruned model's parameter shapes (so an explicit head_dim is honoured)."""
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
    try:  # what from_pretrained does with config.json, the family's validation included
        cfg = type(cfg).from_dict(cfg.to_dict())
        want = reference_shapes(model, cfg)
    except Exception as e:  # noqa: BLE001  any refusal means: not expressible
        text = " ".join(str(e).split()[-24:])
        return None, f"{cfg.model_type}'s config cannot express these widths ({type(e).__name__}: {text})"
    for k, v in model.state_dict().items():
        if want.get(k) != tuple(v.shape):
            return None, f"a model built from the config would not have {k} of shape {tuple(v.shape)}"
    return cfg, None


@no_grad
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


def write_structured(model, tmp: Path, extra: dict | None = None, save_dtype: str = "auto") -> dict:
    """Write the weights (in `save_dtype`, see `sparsellm.models.save.save_model`), config.json and
    structure.json into directory `tmp` (the caller's atomic write). config.json is the plain config at the
    new widths when `vanilla_config` finds one, else the dense model's (then only sparsellm's loader reads
    the directory, and structure.json says why). Returns the structure.json content."""
    cfg, why = vanilla_config(model)
    if cfg is not None:
        _materialise_biases(model, cfg)
    save_model(model, tmp, save_dtype, config=cfg, check=False)  # load_structured checks every key strictly
    info = {"format": "sparsellm-structured", "model_type": model.config.model_type, "blocks": structure(model),
            "vanilla_loadable": cfg is not None, "why_not_vanilla": why, **(extra or {})}
    (Path(tmp) / STRUCTURE).write_text(json.dumps(info, indent=1) + "\n")
    return info
