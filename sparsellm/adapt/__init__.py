"""Sparsity-preserving adaptation (LoSA, Huang et al., ICLR 2025; algorithms.md §8): the masked LoRA linear,
the cubic sparsity schedule, the reconstruction-error rank allocation, and the driver behind
`sparsellm finetune` (LoSA and its baselines: none, lora, masked-lora)."""

from .adapter_io import load_adapter, save_adapter
from .losa import METHODS, FinetuneConfig, finetune
from .masked_lora import (MaskedLoraLinear, add_masked_lora, lora_layers, merge, remove_adapters, set_ranks, unmerge,
                          unwrapped)
from .schedule import allocate_ranks, cubic_schedule

__all__ = ["MaskedLoraLinear", "add_masked_lora", "lora_layers", "merge", "unmerge", "set_ranks", "unwrapped",
           "remove_adapters", "allocate_ranks", "cubic_schedule", "FinetuneConfig", "finetune", "METHODS",
           "save_adapter", "load_adapter"]
