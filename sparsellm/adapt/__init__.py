"""Sparsity-preserving adaptation (LoSA, Huang et al., ICLR 2025; algorithms.md §8): the masked LoRA linear,
the cubic sparsity schedule, the reconstruction-error rank allocation, and the driver behind
`sparsellm finetune` with its methods, registered under kind "finetune": none, lora, masked-lora
(`baselines.py`) and losa (`losa.py`), each with its own config; the shared settings are `config.py`'s."""

import importlib

from .config import FinetuneConfig, LoRAConfig, TrainingConfig
from .schedule import allocate_ranks, cubic_schedule

from . import baselines  # noqa: E402, I001  (each import registers fine-tuning methods, in this order)
from . import losa  # noqa: E402
from .baselines import MaskedLoRAConfig  # noqa: E402
from .losa import LoSAConfig  # noqa: E402

# imported on first use: masked_lora subclasses torch's nn.Module, and the command line's flags need only the configs
_LAZY = {"load_adapter": "adapter_io", "save_adapter": "adapter_io", "finetune": "driver", "prune_like_report": "driver",
         **{name: "masked_lora" for name in ("MaskedLoraLinear", "add_masked_lora", "lora_layers", "merge",
                                             "remove_adapters", "set_ranks", "unmerge", "unwrapped")}}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = ["MaskedLoraLinear", "add_masked_lora", "lora_layers", "merge", "unmerge", "set_ranks", "unwrapped",
           "remove_adapters", "allocate_ranks", "cubic_schedule", "FinetuneConfig", "LoRAConfig", "TrainingConfig",
           "MaskedLoRAConfig", "LoSAConfig", "finetune", "prune_like_report", "save_adapter", "load_adapter"]
