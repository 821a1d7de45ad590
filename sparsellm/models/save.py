"""Writing a model's weights and config.json into a directory the way `save_pretrained` does, with two
guarantees every sparsellm model directory needs:

- **the precision the user expects**: the weights are written in `save_dtype` ("auto": the input
  checkpoint's declared dtype, which `load_model` records; bfloat16 for a GGUF source), config.json declares
  that dtype, and the in-memory model is not changed. Zeros stay exact zeros in every dtype.
- **only keys plain transformers loads**: a model that still has adapter wrappers attached (masked LoRA's
  `base.weight` / `lora_A` / `lora_B`, peft's layers) is refused, since transformers would silently
  re-initialise every wrapped linear at random.

The caller owns the directory (an atomic write: `sparsellm.outputs.atomic_dir_write`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

DTYPES = ("float32", "bfloat16", "float16")  # what a model may be saved in (config.SAVE_DTYPES adds "auto")
DECLARED_DTYPE = "sparsellm_declared_dtype"  # attribute `load_model` sets: the checkpoint's declared dtype


def dtype_name(dtype) -> str | None:
    """"bfloat16" for torch.bfloat16 or "bfloat16"; None for None."""
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def resolve_save_dtype(model, save_dtype: str = "auto") -> torch.dtype:
    """The dtype to write `model`'s weights in. `save_dtype`: "float32", "bfloat16", "float16", or "auto":
    the dtype the input checkpoint declared (recorded by `load_model` as `model.sparsellm_declared_dtype`;
    bfloat16 for a GGUF source), else the dtype of the model's parameters; a declared dtype outside the
    three (float64, a quantized one) gives float32. Raises UsageError for another `save_dtype`."""
    if save_dtype == "auto":
        declared = getattr(model, DECLARED_DTYPE, None) or dtype_name(next(model.parameters()).dtype)
        return getattr(torch, declared) if declared in DTYPES else torch.float32
    if save_dtype not in DTYPES:
        raise UsageError(f"--save_dtype must be one of auto, {', '.join(DTYPES)}; got {save_dtype!r}")
    return getattr(torch, save_dtype)


def reference_shapes(model, config=None) -> dict:
    """{state-dict key: shape} of a fresh model of `model`'s class built from `config` (default: its own)
    on the meta device (nothing allocated): what plain `from_pretrained` expects. Raises UsageError for a
    model that is not a transformers model."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UsageError(f"cannot save a {type(model).__name__} as a transformers model directory (a peft model: "
                         "merge_and_unload() it first)")
    with torch.device("meta"):
        ref = type(model)(copy.deepcopy(config if config is not None else model.config))
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def check_loadable(model) -> None:
    """Raise UsageError unless `model`'s state dict has exactly the keys `reference_shapes` expects, i.e.
    unless plain `from_pretrained` would load every weight. An adapter left attached is named, with how to
    merge it."""
    want, have = reference_shapes(model), model.state_dict()
    unexpected, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    if not (unexpected or missing):
        return
    adapters = [k for k in unexpected if ".lora_" in k or ".base." in k or ".base_layer." in k]
    if adapters:
        raise UsageError(f"the model still has adapter layers attached ({adapters[0]}, ...): plain transformers "
                         "would re-initialise those linears at random. Merge them first "
                         "(sparsellm.adapt.remove_adapters(model), or peft's merge_and_unload())")
    raise UsageError(f"the model's weights do not match its config: unexpected {unexpected[:3]}, missing "
                     f"{missing[:3]}; plain transformers would re-initialise the missing ones at random")


def check_fits(model, save_dtype: str = "auto") -> None:
    """Before any work: UsageError if a weight of `model` is already beyond the range of the dtype it will be
    saved in (float16: |w| > 65504), so a run is not refused only at its end."""
    dtype = resolve_save_dtype(model, save_dtype)
    if dtype == torch.float16:
        top = torch.finfo(dtype).max
        for name, p in model.named_parameters():
            if p.device.type != "meta" and bool((p.detach().abs() > top).any()):  # a lazy block: when written
                raise UsageError(f"{name} has values beyond the range of float16 (|w| > {top:g}): save in bfloat16 "
                                 "or float32 (--save_dtype)")


def _cast(state: dict, dtype: torch.dtype) -> dict:
    """`state` with floating tensors cast to `dtype` (new tensors; tied ones stay one tensor). Raises
    UsageError if a finite weight becomes infinite; logs a warning if non-zeros round to zero."""
    memo, out, underflow = {}, {}, 0
    for k, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key not in memo:
                c = t.to(dtype)
                if not bool((torch.isfinite(c) | ~torch.isfinite(t)).all()):
                    raise UsageError(f"{k} has values beyond the range of {dtype_name(dtype)}: save it in "
                                     "bfloat16 or float32 (--save_dtype)")
                underflow += int(((c == 0) & (t != 0)).sum())
                memo[key] = c
            t = memo[key]
        out[k] = t
    if underflow:
        log.warning("saving in %s rounds %d non-zero weights to zero", dtype_name(dtype), underflow)
    return out


def save_model(model, directory, save_dtype: str = "auto", config=None, check: bool = True) -> torch.dtype:
    """Write `model`'s weights (safetensors, via `save_pretrained`) and config.json (`config`, default the
    model's own) into `directory`, in `resolve_save_dtype(model, save_dtype)`, with config.json declaring
    that dtype. The in-memory model is left as it was. Returns the dtype written. Raises UsageError for an
    unknown `save_dtype` or (with `check`; a structured model with per-block widths is checked by its own
    loader) weights plain transformers would not load (`check_loadable`), UsageError if a weight overflows
    the dtype."""
    dtype = resolve_save_dtype(model, save_dtype)
    if check:
        check_loadable(model)
    model.save_pretrained(directory, state_dict=_cast(model.state_dict(), dtype))
    config = copy.deepcopy(config if config is not None else model.config)
    config.architectures = model.config.architectures  # as save_pretrained set them
    config.dtype = dtype_name(dtype)
    config.save_pretrained(Path(directory))
    return dtype
