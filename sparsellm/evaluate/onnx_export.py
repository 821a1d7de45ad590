"""ONNX export of a decoder LLM for sparse CPU runtimes (DeepSparse), as two fixed-contract graphs:

- `prefill.onnx`: input_ids (batch, T) int64 → logits of the last position (batch, 1, vocab), and the prompt's
  keys and values (batch, layers, kv_heads, T, head_dim) float32, which fill the decode cache.
- `decode.onnx`: one KV-cache decode step over a fixed-capacity cache of C slots.
  Inputs: input_ids (batch, 1) int64; position_ids (batch, 1) int64; attention_mask (batch, C + 1) int64,
  1 for the filled cache slots and for the new token, 0 for empty slots; past_keys and past_values
  (batch, layers, kv_heads, C, head_dim) float32.
  Outputs: logits (batch, 1, vocab); new_keys and new_values (batch, layers, kv_heads, 1, head_dim), which
  the caller writes into slot t of its cache. Every input and output is batch-first, as DeepSparse requires.

Masked (empty) slots get an additive -inf-like bias, so attending over C slots of which t are filled equals
attending over the t filled ones: this is an exact KV-cache decode with static shapes, which DeepSparse
needs (it compiles an engine per input shape). Both graphs use eager attention and an explicit 4-D float
mask built inside the graph, which avoids transformers' mask helpers (pitfalls: ../shared/docs/
cpu-sparse-speed.md). Opset 17 with the TorchScript exporter (DeepSparse 1.8 reads opset ≤ 17).

Only full-causal-attention families are exported: those whose entry in the architecture table
(`sparsellm.models.arch.ARCHITECTURES`) has `onnx=True` (LLaMA, Mistral without a sliding window shorter than
the context, Qwen2); Gemma 3's sliding layers and OPT's learned positions are refused with a UsageError.
Pruned zeros are kept as exact zeros in the dense initializers, where DeepSparse finds them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

from ..errors import UsageError
from ..models.arch import ARCHITECTURES, families, get_blocks
from .speed import cache_kwarg

OPSET = 17


def check_exportable(model, max_tokens: int = 0) -> None:
    """Raises UsageError for an architecture whose attention is not plain full-causal over sequences of up to
    `max_tokens` tokens (a sliding window shorter than that would make the full causal mask wrong)."""
    cfg = model.config
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None or not arch.onnx:
        raise UsageError(f"ONNX export for sparse runtimes supports {', '.join(families('onnx'))} models, "
                         f"not {cfg.model_type!r}")
    _, _, kvh, _, hd = kv_shape(model, 1, 1)
    widths = {block.get_submodule(arch.roles["k"]).out_features for block in get_blocks(model)}
    if widths != {kvh * hd}:
        raise UsageError("a structurally pruned model with per-block attention widths cannot be exported with one "
                         "stacked KV cache; measure it natively with `sparsellm bench` (it is simply smaller)")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < max_tokens:
        raise UsageError(f"{cfg.model_type} with a sliding window of {window} tokens cannot be exported with a full "
                         f"causal mask for sequences of {max_tokens} tokens")


def _bias(keep: torch.Tensor, dtype) -> torch.Tensor:
    """keep (batch, 1, q, kv) bool → additive float mask: 0 where kept, the dtype's minimum elsewhere."""
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


def _stack(cache, which: str) -> torch.Tensor:
    return torch.stack([getattr(layer, which) for layer in cache.layers], dim=1)


class Prefill(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kw = cache_kwarg(model)

    def forward(self, input_ids):
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        idx = torch.arange(t, device=input_ids.device)
        causal = idx[None, :] <= idx[:, None]  # not .tril(): DeepSparse 1.8's runtime lacks Trilu
        mask = _bias(causal[None, None].expand(b, 1, t, t), self.model.dtype)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.kw: cache})
        return out.logits, _stack(cache, "keys"), _stack(cache, "values")


class DecodeStep(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kw = cache_kwarg(model)

    def forward(self, input_ids, position_ids, attention_mask, past_keys, past_values):
        cache = DynamicCache(config=self.model.config)
        for i in range(past_keys.shape[1]):
            cache.update(past_keys[:, i], past_values[:, i], i)
        keep = attention_mask[:, None, None, :].to(torch.bool)  # (batch, 1, 1, C + 1)
        mask = _bias(keep, self.model.dtype)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                         **{self.kw: cache})
        return out.logits, _stack(cache, "keys")[..., -1:, :], _stack(cache, "values")[..., -1:, :]


def kv_shape(model, batch: int, capacity: int) -> tuple[int, int, int, int, int]:
    """(batch, layers, kv_heads, capacity, head_dim) of decode.onnx's past_keys / past_values."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return (batch, cfg.num_hidden_layers, kv, capacity, head_dim)


@torch.no_grad()
def export(model, out_dir: str | Path, capacity: int, max_tokens: int = 0) -> dict:
    """Writes prefill/prefill.onnx and decode/decode.onnx (each with its external weight files when over 2 GB)
    for `model` (float32) into `out_dir`, with dynamic batch and length
    axes (a runtime fixes them per engine). `capacity` is the decode cache size C in tokens; `max_tokens` the
    longest prefill the caller will run (checked against a sliding window). Returns
    {"prefill": path, "decode": path, "kv_shape": [...] at batch 1, "opset": 17}.
    The model's attention implementation is switched to eager (and the model to eval mode) for the export,
    and both are restored afterwards. Raises UsageError for a model that is not float32, an unsupported
    architecture or a capacity beyond the model's context."""
    check_exportable(model, max(capacity + 1, max_tokens))
    ctx = getattr(model.config, "max_position_embeddings", None)
    if capacity < 1 or (ctx and capacity > ctx):  # positions 0 .. capacity - 1
        raise UsageError(f"decode cache capacity {capacity} must be in [1, {ctx or '∞'}] (the model's context)")
    if next(model.parameters()).dtype != torch.float32:
        raise UsageError("export a float32 model (DeepSparse runs float32 graphs); load it with dtype float32")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    old_impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ids = (torch.arange(8) % model.config.vocab_size)[None]  # any ids trace the same graph; no RNG use
        # one folder per graph: above 2 GB torch writes the weights as external files named after internal
        # tensor names, which would collide between the two graphs in one folder
        paths = {g: str(out_dir / g / f"{g}.onnx") for g in ("prefill", "decode")}
        for g in paths:
            Path(paths[g]).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Prefill(model), (ids,), paths["prefill"], dynamo=False, opset_version=OPSET,
                              input_names=["input_ids"], output_names=["logits", "keys", "values"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "logits": {0: "batch"},
                                            "keys": {0: "batch", 3: "length"}, "values": {0: "batch", 3: "length"}})
            shape = kv_shape(model, 1, capacity)
            past = torch.zeros(shape)
            args = (ids[:, :1], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, capacity + 1, dtype=torch.long),
                    past, past.clone())
            kv_axes = {0: "batch"}
            torch.onnx.export(DecodeStep(model), args, paths["decode"], dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "position_ids", "attention_mask", "past_keys", "past_values"],
                              output_names=["logits", "new_keys", "new_values"],
                              dynamic_axes={"input_ids": {0: "batch"}, "position_ids": {0: "batch"},
                                            "attention_mask": {0: "batch"}, "past_keys": kv_axes,
                                            "past_values": kv_axes, "logits": {0: "batch"},
                                            "new_keys": kv_axes, "new_values": kv_axes})
    finally:
        model.set_attn_implementation(old_impl)
        model.train(was_training)
    return {**paths, "kv_shape": list(shape), "capacity": capacity, "opset": OPSET}
