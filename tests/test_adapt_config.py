"""The fine-tuning settings as composed configs (issue "One shape for every run"): each sub-config refuses
its own bad values with a UsageError, no setting is declared twice (every default written once), the old
defaults are kept, flat settings round-trip, and `sparsellm finetune --help` shows the flags in groups."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sparsellm import registry
from sparsellm.adapt import FinetuneConfig, LoRAConfig, LoSAConfig, MaskedLoRAConfig, TrainingConfig
from sparsellm.adapt.config import flat_names
from sparsellm.config import Calibration
from sparsellm.errors import UsageError
from sparsellm.pipeline import PruneConfig

# every default of the old FinetuneConfig and `finetune` flags (sparsellm/cli/_legacy.py before the redesign)
OLD_DEFAULTS = dict(sparsity_ratio=None, sparsity_type="unstructured", prune_method="wanda", steps=5, nsamples=128,
                    seqlen=2048, calib_dataset="c4", seed=0, blocksize=128, percdamp=0.01, batch_size=None,
                    rmi_nsamples=64, rank_nsamples=8, lora_r=8, lora_alpha=16.0, lora_dropout=0.1, r_max=16,
                    rank_start=6.0, rank_end=10.0, lr=2e-4, ft_batch_size=4, grad_accum=2, warmup_ratio=0.3,
                    weight_decay=0.001, max_grad_norm=0.3, gradient_checkpointing=False, step_eval_windows=4,
                    data="c4", ft_nsamples=64, ft_seqlen=512, methods="losa", overwrite=False, resume=False,
                    keep_checkpoint=False, eval="wikitext2", max_windows=None, eval_dense=False, model="smollm2-135m",
                    dtype="auto")  # float32 on a CPU (sparsellm.devices)


def _losa(**flat):
    return FinetuneConfig.from_flat(method="losa", **flat)


@pytest.mark.parametrize("make,match", [
    # PruneConfig: the target, the pattern, the pruner
    (lambda: _losa(sparsity_ratio=1.0), "sparsity"),
    (lambda: _losa(sparsity_type="2:5:1"), "N:M"),
    (lambda: _losa(prune_method="obs"), "unknown prune method"),
    (lambda: FinetuneConfig(prune=PruneConfig(allocation="owl")), "uniform rates"),
    # SparseGPT's own config, inside the PruneConfig
    (lambda: _losa(prune_method="sparsegpt", blocksize=0), "--blocksize"),
    # Calibration, inside the PruneConfig
    (lambda: _losa(nsamples=0), "--nsamples"),
    (lambda: _losa(seqlen=1), "--seqlen"),
    # LoRAConfig
    (lambda: FinetuneConfig.from_flat(method="lora", lora_r=0), "LoRA rank"),
    (lambda: _losa(lora_dropout=1.0), "--lora_dropout"),
    (lambda: _losa(lora_alpha=math.nan), "--lora_alpha"),
    # TrainingConfig
    (lambda: _losa(lr=0.0), "--lr"),
    (lambda: _losa(lr=math.inf), "finite"),
    (lambda: _losa(ft_batch_size=0), "--ft_batch_size"),
    (lambda: _losa(ft_seqlen=1), "--ft_seqlen"),
    # FinetuneConfig's own
    (lambda: _losa(step_eval_windows=-1), "--step_eval_windows"),
    (lambda: FinetuneConfig(method="bogus"), "unknown fine-tuning method 'bogus'"),
    (lambda: FinetuneConfig(method="lora", method_config=LoSAConfig()), "not the config"),
    # masked-lora's config
    (lambda: FinetuneConfig.from_flat(method="masked-lora", lora_r=9, r_max=8), "r_max"),
    # LoSA's config, and RMI's inside it
    (lambda: _losa(steps=0), "--steps"),
    (lambda: _losa(rank_end=17), "--rank_end"),
    (lambda: _losa(rank_nsamples=0), "--rank_nsamples"),
    (lambda: _losa(sparsity_type="2:4"), "N:M"),
    (lambda: _losa(ft_nsamples=3, steps=4), "own slice"),
    (lambda: _losa(rmi_nsamples=0), "--rmi_nsamples"),
    (lambda: _losa(rmi_delta=0.9), "δ"),
])
def test_each_sub_config_refuses_a_bad_value(make, match):
    with pytest.raises(UsageError, match=match) as e:
        make().validate()
    assert type(e.value) is UsageError


def test_no_setting_is_declared_twice():
    """Every leaf setting of the fine-tuning configs is declared in exactly one class body: none of them
    repeats a PruneConfig, Calibration, pruner or allocator setting (RMI's are composed, not copied), and
    masked LoRA's r_max is LoSA's by inheritance."""
    owners = {}

    def declare(label, cls):
        for f in dataclasses.fields(cls):
            if f.name not in vars(cls).get("__annotations__", {}):
                continue  # inherited: declared by a base class
            if f.name in ("pruner", "allocator", "calibration", "prune", "lora", "training", "method_config") or (
                    isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)):
                continue  # a nested config: composition
            assert f.name not in owners, f"{f.name} in {owners[f.name]} and {label}"
            owners[f.name] = label

    declare("PruneConfig", PruneConfig)
    declare("Calibration", Calibration)
    for kind in ("pruner", "allocator"):
        for n in registry.names(kind):
            declare(f"{kind}:{n}", registry.get(kind, n).config)
    prune_side = set(owners)
    for label, cls in (("FinetuneConfig", FinetuneConfig), ("LoRAConfig", LoRAConfig),
                       ("TrainingConfig", TrainingConfig)):
        declare(label, cls)
    seen_classes = set()
    for n in registry.names("finetune"):
        cls = registry.get("finetune", n).config
        for base in reversed(cls.__mro__):
            if dataclasses.is_dataclass(base) and base not in seen_classes:
                seen_classes.add(base)
                declare(f"finetune:{base.__name__}", base)
    moved = {"sparsity_ratio", "sparsity_type", "prune_method", "nsamples", "seqlen", "calib_dataset", "seed",
             "blocksize", "percdamp", "batch_size", "rmi_nsamples"}  # were re-declared by the old FinetuneConfig
    assert moved <= prune_side
    assert not {f.name for f in dataclasses.fields(FinetuneConfig)} & prune_side
    assert "r_max" not in vars(LoSAConfig)["__annotations__"] and issubclass(LoSAConfig, MaskedLoRAConfig)


def test_defaults_are_the_old_ones():
    from sparsellm.cli import build_parser

    args = vars(build_parser().parse_args(["finetune", "--model", "smollm2-135m", "--out", "o"]))  # --model: required
    assert {k: args[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert args["eval_seqlen"] == 2048  # the shared Evaluation default (was the calibration seqlen, at most 2048)
    flat = _losa().validate().to_dict()
    assert {k: flat[k] for k in OLD_DEFAULTS if k in flat} == {**{k: OLD_DEFAULTS[k] for k in OLD_DEFAULTS if k in flat},
                                                               "sparsity_ratio": 0.5}


@pytest.mark.parametrize("method", ["none", "lora", "masked-lora", "losa"])
def test_flat_settings_round_trip(method):
    cfg = FinetuneConfig.from_flat(method=method, prune_method="sparsegpt", blocksize=64, lr=1e-3, nsamples=16,
                                   lora_r=4, r_max=12, steps=3, rmi_beta=2.0, sparsity_ratio=0.6).validate()
    flat = cfg.to_dict()
    assert len(flat) == len(set(flat))
    again = FinetuneConfig.from_flat(**flat).validate()
    assert again == cfg and again.to_dict() == flat
    own = set(flat_names(type(cfg.method_config)))
    assert own <= set(flat) and (method != "losa" or {"steps", "rmi_beta", "r_max"} <= own)
    if method in ("none", "lora"):
        assert "steps" not in flat and "r_max" not in flat  # not their settings


def test_another_methods_setting_is_ignored_but_an_unknown_one_is_refused():
    cfg = FinetuneConfig.from_flat(method="none", steps=3, r_max=4)
    assert cfg.method_config == registry.NoConfig()
    with pytest.raises(UsageError, match="unknown settings: bogus"):
        FinetuneConfig.from_flat(method="none", bogus=1)


def test_help_shows_each_group(capsys):
    from sparsellm.cli import main

    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    groups = ["model", "calibration", "method", "fine-tuning", "evaluation", "output"]
    sections, current = {}, None
    for line in out.splitlines():
        if line.endswith(":") and not line.startswith(" ") and line[:-1] in groups + ["options"]:
            current = line[:-1]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    assert [g for g in sections if g != "options"] == groups
    expect = {"model": ["--model", "--dtype"], "calibration": ["--nsamples", "--seqlen", "--seed", "--batch_size"],
              "method": ["--method", "--prune_method", "--sparsity_ratio", "--blocksize", "--steps", "--r_max",
                         "--rank_start", "--rmi_nsamples"],
              "fine-tuning": ["--lora_r", "--data", "--ft_nsamples", "--lr", "--gradient_checkpointing",
                              "--step_eval_windows"],
              "evaluation": ["--eval", "--eval_seqlen", "--eval_dense", "--tasks"],
              "output": ["--out", "--save_model", "--overwrite", "--resume", "--keep_checkpoint"]}
    for group, flags in expect.items():
        for flag in flags:
            assert f"  {flag} " in sections[group] or f"  {flag}\n" in sections[group] or \
                f", {flag} " in sections[group], (flag, group)
    text = " ".join(out.split())
    for phrase in ("seed for calibration windows (fine-tuning data: seed + 1)", "unstructured or N:M (not with losa)",
                   "pruner for the baselines' prune and LoSA's re-pruning (the paper: wanda or sparsegpt)",
                   "LoSA: windows for RMI's CKA at every step",
                   "target S in [0, 1); when left out: an already-pruned input's own"):
        assert phrase in text
