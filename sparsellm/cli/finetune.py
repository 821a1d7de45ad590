"""`sparsellm finetune`: recover a sparse model's quality with sparsity-preserving LoRA (LoSA and baselines)."""

from __future__ import annotations

from . import _legacy
from .common import add_quiet


def add_parser(sub) -> None:
    f = sub.add_parser("finetune", help="recover a sparse model's quality with sparsity-preserving LoRA: LoSA "
                       "(dynamic) and its baselines (none, lora, masked-lora) at an equal token budget")
    _legacy._add_finetune_args(f)
    add_quiet(f)
    f.set_defaults(run=_legacy.cmd_finetune)
