"""Models larger than memory: a weightless skeleton whose decoder blocks are read from the checkpoint's
(sharded) safetensors only when their turn comes, and a writer that streams each pruned block into the
output's shards as soon as it is done.

    model = lazy_model("path/to/hf_dir", torch.float32, device)   # embeddings loaded, blocks on "meta"
    onloader(model).block(i)  ->  block i read from the shards onto the device (cast to the forward dtype)
    onloader(model).release(i, changed=True)  ->  ShardWriter.write_block(i, block), then back to "meta"

The output uses Hugging Face's sharded layout: `model-0000k-of-0000N.safetensors`, one shard per decoder
block and a last one for the embeddings, final norm and output head (copied from the input, cast to the
saved dtype), and `model.safetensors.index.json`; vanilla `from_pretrained` loads it. Peak memory is the
embeddings, one or two blocks and the calibration activations, whatever the model's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

from ..errors import UsageError
from ..lazy import lazy_import
from .arch import check_supported, get_arch, get_blocks
from .save import DECLARED_DTYPE, _cast, dtype_name

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_safetensors_dir(path) -> bool:
    """Whether `path` is an HF directory whose weights are safetensors (sharded with an index, or one file)."""
    path = Path(path)
    return (path / INDEX).is_file() or (path / SINGLE).is_file()


class LazyCheckpoint:
    """The tensors of an HF safetensors checkpoint, by name, read only when asked for.

    Opening it checks the layout before any work: the index parses, every shard it names exists, and every
    shard holds exactly the tensors the index maps to it. Raises UsageError naming the first disagreement."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        self.weight_map: dict[str, str] = {}
        try:
            if (self.path / INDEX).is_file():
                self.weight_map = dict(json.loads((self.path / INDEX).read_text())["weight_map"])
            elif (self.path / SINGLE).is_file():
                try:
                    with safe_open(str(self.path / SINGLE), "pt") as f:
                        self.weight_map = {k: SINGLE for k in f.keys()}
                except Exception as e:  # a truncated or corrupt file (safetensors' own error type)
                    raise UsageError(f"{self.path / SINGLE} is not a readable safetensors file: "
                                     f"{' '.join(str(e).split())}") from None
            else:
                raise UsageError(f"{self.path} has no {INDEX} or {SINGLE}: lazy loading reads safetensors only")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{self.path / INDEX} is not a readable safetensors index: {e}") from None
        self.shapes: dict[str, tuple] = {}
        for name in sorted(set(self.weight_map.values())):
            file = self.path / name
            if not file.is_file():
                raise UsageError(f"{self.path}: shard {name} named by {INDEX} is missing")
            try:
                with safe_open(str(file), "pt") as f:
                    keys = set(f.keys())
                    self.shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in keys})
            except Exception as e:  # a truncated or corrupt shard
                raise UsageError(f"{file} is not a readable safetensors file: {' '.join(str(e).split())}") from None
            listed = {k for k, v in self.weight_map.items() if v == name}
            if keys != listed:
                extra, lost = sorted(keys - listed), sorted(listed - keys)
                raise UsageError(f"{file.name} disagrees with {INDEX}: "
                                 + (f"{lost[0]} is listed but not in the shard" if lost else
                                    f"{extra[0]} is in the shard but not listed"))

    def key(self, name: str) -> str | None:
        """The checkpoint's name for the model's parameter `name` (also without / with the "model." prefix
        that some checkpoints drop or add), or None."""
        for k in (name, name.removeprefix("model."), "model." + name):
            if k in self.weight_map:
                return k
        return None

    def read(self, names: list[str], dtype=None, device="cpu") -> dict:
        """{model name: tensor} for the model's parameter `names`, shard by shard, cast to `dtype`."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[self.key(n)], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.path / file), "pt", device="cpu") as f:
                for n in group:
                    t = f.get_tensor(self.key(n))
                    out[n] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        return out

    def fingerprint(self) -> dict:
        """What identifies this checkpoint for `--resume`: every shard's name, size and modification time,
        and the other files of the directory (config, tokenizer) by their SHA-256."""
        files = sorted(set(self.weight_map.values()))
        small = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(self.path.iterdir())
                 if f.is_file() and f.suffix != ".safetensors" and f.stat().st_size < 64 << 20}
        return {"path": str(self.path.resolve()), "files": small,  # config.json, the tokenizer's files: by content
                "shards": {f: [os.stat(self.path / f).st_size, os.stat(self.path / f).st_mtime_ns] for f in files}}


def _params(module) -> dict:
    """{name: parameter} of `module`, tied parameters once (the first name)."""
    return dict(module.named_parameters())


def lazy_model(path, dtype=None):
    """The model at `path` (an HF directory with safetensors) as a skeleton: the small modules outside the
    blocks loaded in `dtype`; the input embeddings and the output head on "meta" until they are needed
    (`load_embeddings` while the block-0 inputs are captured, `load_head` for evaluation), every block on "meta"
    until `onload.Onloader` reads it (`onload.attach(model, device)` chooses the compute device). Raises UsageError for an unsupported architecture, shards that are missing or disagree with
    the index, or a checkpoint that lacks a weight of the architecture or holds one of another shape."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    ckpt = LazyCheckpoint(path)
    config = AutoConfig.from_pretrained(path)
    check_supported(config.model_type)
    declared = dtype_name(config.dtype)  # before from_config, which sets config.dtype to `dtype`
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(_params(model))
    for name, p in model.named_parameters():
        k = ckpt.key(name)
        if k is None:
            if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False):
                continue
            raise UsageError(f"{path} lacks the weight {name} of its architecture ({config.model_type})")
        if ckpt.shapes[k] != tuple(p.shape):
            raise UsageError(f"{path}: {k} has shape {list(ckpt.shapes[k])}, the architecture needs {list(p.shape)}")
    blocks_prefix = get_arch(model).blocks + "."
    big = {n for n, m in model.named_modules() if m is model.get_output_embeddings() or m is model.get_input_embeddings()}
    rest = [n for n in _params(model) if not n.startswith(blocks_prefix) and n.rpartition(".")[0] not in big]
    _assign(model, ckpt.read(rest, dtype))  # norms, learned positions, OPT's projections: small
    setattr(model, DECLARED_DTYPE, declared)
    model.sparsellm_lazy = ckpt
    model.sparsellm_blocks = _Blocks(ckpt, dtype)  # what `onload.Onloader` reads and drops the blocks with
    return model


def _module_params(model, module) -> list[str]:
    prefix = next(n for n, m in model.named_modules() if m is module)
    return [f"{prefix}.{n}" for n in dict(module.named_parameters())]


def _read_into(model, module, device) -> None:
    """Read `module`'s parameters from the lazy checkpoint onto `device`; a head tied to the input embeddings
    (no checkpoint key of its own) reads theirs."""
    names = _module_params(model, module)
    ckpt, dtype = model.sparsellm_lazy, model.sparsellm_blocks.dtype
    own = [n for n in names if ckpt.key(n) is not None]
    tensors = ckpt.read(own, dtype, device or "cpu")
    if len(own) < len(names):  # tied: lm_head.weight is the embedding matrix
        emb = _module_params(model, model.get_input_embeddings())[0]
        t = ckpt.read([emb], dtype, device or "cpu")[emb]
        tensors.update({n: t for n in names if n not in own})
    _assign(model, tensors)


def load_head(model, device=None) -> None:
    """Read a lazy model's output head (and nothing else) from its checkpoint, for evaluation."""
    head = model.get_output_embeddings()
    if head.weight.device.type == "meta":
        _read_into(model, head, device)


def load_embeddings(model, device=None) -> None:
    """Read a lazy model's input embeddings onto `device` (they are dropped again with `drop_embeddings`)."""
    emb = model.get_input_embeddings()
    if emb.weight.device.type == "meta":
        _read_into(model, emb, device)


def drop_embeddings(model) -> None:
    """Put a lazy model's input embeddings back on the meta device (they take ~0.8 GB for a 7B model in
    float32, and only the capture of the block-0 inputs reads them)."""
    emb = model.get_input_embeddings()
    for name in _module_params(model, emb):
        owner, _, attr = name.rpartition(".")
        sub = model.get_submodule(owner)
        setattr(sub, attr, torch.nn.Parameter(torch.empty_like(getattr(sub, attr), device="meta"),
                                              requires_grad=False))


def _assign(module, tensors: dict) -> None:
    """Replace `module`'s (meta) parameters by `tensors` ({dotted name: tensor})."""
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        setattr(sub, attr, torch.nn.Parameter(t, requires_grad=False))


class _Blocks:
    """What `onload.Onloader` calls for a lazy model: read block i onto a device, drop it back to "meta"
    (through `writer.write_block` first when it changed and a writer is set)."""

    def __init__(self, ckpt: LazyCheckpoint, dtype):
        self.ckpt, self.dtype, self.writer = ckpt, dtype, None

    def load_block(self, model, i: int, device) -> None:
        block = get_blocks(model)[i]
        prefix = f"{get_arch(model).blocks}.{i}."
        names = [prefix + n for n in _params(block)]
        _assign(model, self.ckpt.read(names, self.dtype, device))
        meta = [n for n, t in block.state_dict().items() if t.device.type == "meta"]
        if meta:
            raise UsageError(f"block {i} of the lazy model keeps {meta[0]} on the meta device")

    def release_block(self, model, i: int, changed: bool) -> None:
        block = get_blocks(model)[i]
        if changed and self.writer is not None:
            self.writer.write_block(model, i, block)
        block.to_empty(device="meta")
        trim_heap()


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise, and the peak RSS of a block-by-
    block run would grow with fragmentation)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class ShardWriter:
    """Stream a lazy model's pruned blocks into `directory` as HF shards: block i into shard i + 1 of N =
    blocks + 1, the rest (`write_rest`) into shard N, then `finish` writes the index and config.json.
    `save_dtype`: torch dtype of the written weights. Each shard is written to a temporary name and
    renamed, so a shard that exists is complete."""

    def __init__(self, directory, model, save_dtype):
        self.dir, self.dtype = Path(directory), save_dtype
        self.n = len(get_blocks(model)) + 1

    def shard(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n:05d}.safetensors"

    def _save(self, k: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.shard(k)}.tmp"
        save_file({n: t.contiguous() for n, t in _cast(tensors, self.dtype).items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, self.dir / self.shard(k))

    def write_block(self, model, i: int, block) -> None:
        prefix = f"{get_arch(model).blocks}.{i}."
        self._save(i, {prefix + n: t.detach().to("cpu") for n, t in block.state_dict().items()})

    def write_rest(self, model) -> None:
        """The tensors outside the blocks, read again from the input checkpoint (an untied head too)."""
        prefix = get_arch(model).blocks + "."
        ckpt = model.sparsellm_lazy  # what the input has (a tied head has no key of its own)
        names = [n for n in dict(model.named_parameters(remove_duplicate=False))
                 if not n.startswith(prefix) and ckpt.key(n) is not None]
        self._save(self.n - 1, model.sparsellm_lazy.read(names))

    def finish(self, model) -> None:
        """The index (every shard must exist) and config.json declaring the saved dtype."""
        from safetensors import safe_open

        weight_map, total = {}, 0
        for k in range(self.n):
            with safe_open(str(self.dir / self.shard(k)), "pt") as f:
                for key in f.keys():
                    weight_map[key] = self.shard(k)
                    sl = f.get_slice(key)
                    total += math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        import copy

        config = copy.deepcopy(model.config)
        config.dtype = dtype_name(self.dtype)
        config.save_pretrained(self.dir)


def _itemsize(name: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}.get(name, 4)
