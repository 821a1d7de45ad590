"""`sparsellm finetune`: recover a sparse model's quality with sparsity-preserving LoRA (LoSA and its baselines).
Flags come from the run's configs, in groups; the settings of every registered fine-tuning method are flags,
and each method of a comparison reads its own."""

from __future__ import annotations

import dataclasses

from ..config import Calibration, Evaluation, ModelSource, Output
from ..registry import get, names
from .common import add_config, add_quiet, config_from

HELP = ("recover a sparse model's quality with sparsity-preserving LoRA: LoSA (dynamic) and its baselines (none, "
        "lora, masked-lora) at an equal token budget")
CALIBRATION_HELPS = {"nsamples": "calibration windows for pruning",
                     "seed": "seed for calibration windows (fine-tuning data: seed + 1)"}
PRUNE_HELPS = {"sparsity_ratio": "target S in [0, 1); when left out: an already-pruned input's own (its masks "
                                  "are kept; another S is refused), else 0.5",
               "sparsity_type": "unstructured or N:M (not with losa)",
               "prune_method": "pruner for the baselines' prune and LoSA's re-pruning (the paper: wanda or sparsegpt)"}
METHOD_HELPS = {"rmi_nsamples": "LoSA: windows for RMI's CKA at every step"}
OUTPUT_HELPS = {"out": "output directory (the merged sparse model, adapter/, reports)",
                "overwrite": "replace existing outputs and checkpoints"}


def _add_nested(group, config, seen: set, helps: dict) -> None:
    """Flags for `config`'s fields and for the configs nested in it, each setting once."""
    seen.update(add_config(group, config, skip=seen, helps=helps))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _add_nested(group, value, seen, helps)


def add_parser(sub) -> None:
    from ..adapt import FinetuneConfig, LoRAConfig, TrainingConfig
    from ..runs.finetune import FinetuneRun

    p = sub.add_parser("finetune", help=HELP)
    run_defaults, ft = FinetuneRun(), FinetuneConfig()
    add_config(p.add_argument_group("model"), ModelSource(), required=("model",))
    add_config(p.add_argument_group("calibration"), Calibration(), helps=CALIBRATION_HELPS)
    method = p.add_argument_group("method")
    add_config(method, run_defaults, skip=("resume", "keep_checkpoint"))
    add_config(method, ft.prune, skip=("allocation", "diag_nsamples"), helps=PRUNE_HELPS)
    seen: set = set()
    for kind in ("pruner", "finetune"):
        for name in names(kind):
            _add_nested(method, get(kind, name).config(), seen, METHOD_HELPS)
    tuning = p.add_argument_group("fine-tuning")
    add_config(tuning, LoRAConfig())
    add_config(tuning, TrainingConfig())
    add_config(tuning, ft)
    add_config(p.add_argument_group("evaluation"), Evaluation())
    output = p.add_argument_group("output")
    add_config(output, Output(), skip=("save",), required=("out",), helps=OUTPUT_HELPS)
    add_config(output, run_defaults, skip=("methods",))
    add_quiet(p)
    p.set_defaults(run=run)


def finetune_run(args):
    """The FinetuneRun of the parsed flags: the shared settings and every registered method's own config
    (a pruner setting of an unchosen pruner, given a non-default value, is refused)."""
    from ..adapt.config import FinetuneConfig, method_config
    from ..runs.finetune import FinetuneRun

    flat = {k: v for k, v in vars(args).items() if k in _settings()}
    return FinetuneRun(source=config_from(args, ModelSource), methods=args.methods,
                       finetune=FinetuneConfig.from_flat(**flat),
                       method_configs={n: method_config(n, flat) for n in names("finetune")},
                       evaluation=config_from(args, Evaluation), output=config_from(args, Output),
                       resume=args.resume, keep_checkpoint=args.keep_checkpoint).refuse_unchosen_settings()


def _settings() -> set[str]:
    """Names of the flags that go to FinetuneConfig.from_flat."""
    from ..adapt.config import LoRAConfig, TrainingConfig
    from ..config import flat_names

    out = {"step_eval_windows", "sparsity_ratio", "sparsity_type", "prune_method"}
    out.update(flat_names(Calibration), flat_names(LoRAConfig), flat_names(TrainingConfig))
    for kind in ("pruner", "finetune"):
        for name in names(kind):
            out.update(flat_names(get(kind, name).config))
    return out


def run(args) -> int:
    from ..distributed import is_main
    from ..runs.finetune import comparison_text, run_finetune

    record = run_finetune(finetune_run(args), progress=not args.quiet)
    if is_main():  # under accelerate launch / torchrun, one summary
        print(comparison_text(record))
    return 0
