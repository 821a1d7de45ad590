"""Sparsity-preserving adaptation (LoSA, Huang et al., ICLR 2025; algorithms.md §8): the masked LoRA linear,
the cubic sparsity schedule and the reconstruction-error rank allocation. The fine-tuning driver
(`sparsellm finetune`) is not built yet."""

from .masked_lora import MaskedLoraLinear, add_masked_lora, lora_layers, merge, set_ranks, unmerge
from .schedule import allocate_ranks, cubic_schedule

__all__ = ["MaskedLoraLinear", "add_masked_lora", "lora_layers", "merge", "unmerge", "set_ranks",
           "allocate_ranks", "cubic_schedule"]
