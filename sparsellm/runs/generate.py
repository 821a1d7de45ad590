"""`run_generate`: load a model, optionally swap its pruned linears for the CPU sparse kernels, and generate
greedily from a prompt with a KV cache, timing prefill and decode (what `sparsellm generate` does)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_model_spec, setting
from ..errors import UsageError

KERNELS = ("sparse", "dense")
VALUES = ("float16", "bfloat16", "float32", "int8")  # the sparse kernels' value dtypes (torch dtype names)
VALUES_HELP = ("value dtype of the sparse kernels: float16, bfloat16, float32, or int8 (per-row fp32 scales: "
               "pruned and quantized; sparsellm/kernels/format.py)")


@dataclass
class GenerateRun:
    """Greedy KV-cache generation of `max_new_tokens` after `prompt`, with the model's linears in our sparse
    kernels (`kernels="sparse"`, values in `values`, every linear with at least `min_sparsity` zeros) or dense."""

    model: str = setting(None, "the (pruned) model: directory, hub id, .gguf or preset")
    prompt: str = setting("The capital of France is", "the prompt text")
    max_new_tokens: int = setting(32, "tokens to generate")
    kernels: str = setting("sparse", "sparse: pruned linears through sparsellm's CPU sparse kernels; dense: "
                                     "PyTorch fp32", choices=KERNELS)
    values: str = setting("float16", VALUES_HELP, choices=VALUES)
    min_sparsity: float = setting(0.3, "linears with fewer zeros stay dense (sparse kernels only)")
    threads: int | None = setting(None, "torch and kernel threads (default: torch's choice)")

    def validate(self) -> "GenerateRun":
        check_model_spec(self.model)
        if self.kernels not in KERNELS:
            raise UsageError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.values not in VALUES:
            raise UsageError(f"--values must be one of {', '.join(VALUES)}, got {self.values!r}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise UsageError(f"--min_sparsity must be in [0, 1], got {self.min_sparsity}")
        if not self.prompt:
            raise UsageError("--prompt must not be empty")
        return self


def run_generate(cfg: GenerateRun) -> dict:
    """Returns generate_timed's result plus {"text" (the new tokens decoded), "kernels", "swap" (sparsify's
    record, None for dense), "threads"}. Raises UsageError for bad settings, a model that cannot be loaded, or a
    prompt plus max_new_tokens longer than the model's context (config.max_position_embeddings)."""
    import torch

    from ..kernels import sparsify
    from ..kernels.generate import generate_timed
    from ..models import load_model

    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, tok, _ = load_model(cfg.model, torch.float32)
    ids = tok(cfg.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError("the prompt tokenizes to no tokens")
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and ids.shape[1] + cfg.max_new_tokens - 1 > ctx:  # the last new token is never fed back
        raise UsageError(f"the prompt's {ids.shape[1]} tokens + --max_new_tokens {cfg.max_new_tokens} exceed the "
                         f"model's context of {ctx} tokens")
    swap = (sparsify(model, min_sparsity=cfg.min_sparsity, dtype=getattr(torch, cfg.values))
            if cfg.kernels == "sparse" else None)
    res = generate_timed(model, ids, cfg.max_new_tokens, tok.eos_token_id)
    res.update(text=tok.decode(res["ids"][0, ids.shape[1]:], skip_special_tokens=True), kernels=cfg.kernels,
               swap=swap, threads=torch.get_num_threads())
    return res
