"""The settings of a fine-tuning run, composed of small configs so that every setting is declared once:

    FinetuneConfig
        method            a registered fine-tuning method (kind "finetune": none, lora, masked-lora, losa)
        method_config     that method's own config (masked-lora: r_max; LoSA: r_max, steps, ranks, RMI's config)
        prune             a PruneConfig: the pruner, the target S and pattern, the calibration windows
                          (uniform allocation, no cumulative-error diagnostic: LoSA chooses its own rates)
        lora              LoRAConfig: the adapter's r, α and dropout
        training          TrainingConfig: the data, the token budget and the optimiser loop
        step_eval_windows WikiText-2 windows scored after every step

    cfg = FinetuneConfig.from_flat(method="losa", sparsity_ratio=0.6, steps=3, lr=1e-4, nsamples=32)

The command line builds its flags from these dataclasses (`sparsellm.cli.finetune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import build, flat_names, flatten, setting
from ..errors import UsageError
from ..pipeline import PruneConfig
from ..registry import get, names


@dataclass
class LoRAConfig:
    """The adapter: rank r (its scaling is α/r), α, and dropout on the adapter's input (the reference's 8, 16,
    0.1 on all seven projections)."""

    lora_r: int = setting(8, "LoRA rank r (scaling α/r)")
    lora_alpha: float = setting(16.0, "LoRA α")
    lora_dropout: float = setting(0.1, "dropout on the adapter's input")

    def validate(self) -> "LoRAConfig":
        if int(self.lora_r) < 1:
            raise UsageError(f"LoRA rank must be >= 1, got r={self.lora_r}")
        if not math.isfinite(float(self.lora_alpha)) or self.lora_alpha <= 0:
            raise UsageError(f"--lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        return self


@dataclass
class TrainingConfig:
    """The fine-tuning data (`ft_nsamples` examples of at most `ft_seqlen` tokens from `data`: the token
    budget every method gets) and the optimiser loop (the reference's AdamW 2e-4, micro-batches of 4,
    2 accumulated, warm-up 0.3, weight decay 0.001, clipping at 0.3); each LoSA step starts a fresh schedule."""

    data: str = setting("c4", "fine-tuning data: c4 (bundled), a text file, or an Alpaca-style instruction "
                              ".json/.jsonl")
    ft_nsamples: int = setting(64, "fine-tuning examples (the token budget)")
    ft_seqlen: int = setting(512, "tokens per fine-tuning example (at most)")
    lr: float = setting(2e-4, "AdamW learning rate")
    ft_batch_size: int = setting(4, "examples per micro-batch")
    grad_accum: int = setting(2, "micro-batches per optimiser step")
    warmup_ratio: float = setting(0.3, "linear warm-up, fraction of optimiser steps")
    weight_decay: float = setting(0.001, "AdamW weight decay")
    max_grad_norm: float = setting(0.3, "gradient clipping")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward")

    def validate(self, check_file: bool = False) -> "TrainingConfig":
        """Raises UsageError for bad values and, with `check_file`, a data file that does not exist."""
        if not all(math.isfinite(float(v)) for v in (self.lr, self.weight_decay, self.max_grad_norm)):
            raise UsageError("--lr, --weight_decay and --max_grad_norm must be finite numbers")
        if self.lr <= 0 or self.ft_batch_size < 1 or self.grad_accum < 1 or not 0 <= self.warmup_ratio < 1 \
                or self.max_grad_norm <= 0 or self.weight_decay < 0:
            raise UsageError("--lr and --max_grad_norm must be > 0, --ft_batch_size and --grad_accum >= 1, "
                             "--warmup_ratio in [0, 1), --weight_decay >= 0")
        if self.ft_nsamples < 1 or self.ft_seqlen < 2:
            raise UsageError("--ft_nsamples must be >= 1 and --ft_seqlen >= 2")
        if check_file and self.data != "c4":
            from pathlib import Path

            if not Path(self.data).expanduser().is_file():
                raise UsageError(f"data file not found: {self.data}")
        return self


def _uniform_prune() -> PruneConfig:
    return PruneConfig(diag_nsamples=0)


@dataclass
class FinetuneConfig:
    """One fine-tuning method's settings (see the module docstring). `method_config` None: the method's
    defaults. `prune.sparsity_ratio` None: 0.5, or implied by an N:M `prune.sparsity_type`."""

    method: str = "losa"
    method_config: object = None
    prune: PruneConfig = field(default_factory=_uniform_prune)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    step_eval_windows: int = setting(4, "WikiText-2 windows scored after every step (0: none)")

    @property
    def calibration(self):
        return self.prune.calibration

    @property
    def sparsity_ratio(self) -> float | None:
        return self.prune.sparsity_ratio

    @classmethod
    def from_flat(cls, **settings) -> "FinetuneConfig":
        """A config from flat keyword settings (the command line's shape): `method` and `step_eval_windows`,
        the LoRA and training settings, the chosen method's own settings, and the rest for
        `PruneConfig.from_flat` (with allocation "uniform" and diag_nsamples 0 unless given). Settings of
        another fine-tuning method are ignored (one comparison shares one set of flags); any other unknown
        setting raises UsageError, as does a pruner setting of an unchosen pruner."""
        settings = dict(settings)
        top = {k: settings.pop(k) for k in ("method", "step_eval_windows") if k in settings}
        method = top.get("method", cls.method)
        subs = {name: build(sub, settings) for name, sub in (("lora", LoRAConfig), ("training", TrainingConfig))}
        for sub in (LoRAConfig, TrainingConfig):
            for k in flat_names(sub):
                settings.pop(k, None)
        own = None
        try:
            own = method_config(method, settings)
        except UsageError:
            pass  # validate() names the unknown method
        for name in names("finetune"):
            for k in flat_names(get("finetune", name).config):
                settings.pop(k, None)
        settings.setdefault("allocation", "uniform")
        settings.setdefault("diag_nsamples", 0)
        return cls(**top, method_config=own, prune=PruneConfig.from_flat(**settings), **subs)

    def validate(self) -> "FinetuneConfig":
        """Checks that need no model; fills the defaults (the method's config, the target from an N:M
        pattern). Raises UsageError."""
        method = get("finetune", self.method)
        if self.method_config is None:
            self.method_config = method.config()
        if type(self.method_config) is not method.config:
            raise UsageError(f"a {type(self.method_config).__name__} is not the config of fine-tuning method "
                             f"{self.method!r} ({method.config.__name__})")
        if self.prune.allocation != "uniform":
            raise UsageError("fine-tuning prunes with uniform rates (LoSA allocates with RMI at every step); "
                             f"allocation {self.prune.allocation!r} is not supported")
        if self.prune.diag_nsamples is None:
            self.prune.diag_nsamples = 0
        self.prune.validate()
        self.lora.validate()
        self.training.validate()
        if self.step_eval_windows < 0:
            raise UsageError(f"--step_eval_windows must be >= 0, got {self.step_eval_windows}")
        self.method_config.validate(self)
        return self

    def to_dict(self) -> dict:
        """Flat settings, as `from_flat` takes them (what report.json records as `config`)."""
        return {"method": self.method, **self.prune.to_dict(), **flatten(self.lora), **flatten(self.training),
                **flatten(self.method_config), "step_eval_windows": self.step_eval_windows}


def method_config(name: str, settings: dict | None = None):
    """Fine-tuning method `name`'s config from the keys of `settings` that are its (nested) fields. Raises
    UsageError for an unknown method."""
    return build(get("finetune", name).config, settings or {})


__all__ = ["LoRAConfig", "TrainingConfig", "FinetuneConfig", "method_config"]
