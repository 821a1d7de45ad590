"""The method registry and the composed prune config: each method's config holds only its own fields, every
default is written once, and a setting of a method that is not chosen is refused."""

from __future__ import annotations

import dataclasses

import pytest

from sparsellm import registry
from sparsellm.config import Calibration
from sparsellm.errors import UsageError
from sparsellm.pipeline import PruneConfig
from sparsellm.prune.sparsegpt import SparseGPTConfig


def test_every_kind_lists_its_methods_in_order():
    assert registry.names("pruner") == ["magnitude", "wanda", "sparsegpt"]
    assert registry.names("allocator") == ["uniform", "atp", "owl", "rmi", "dlp", "alphapruning", "lsa", "atp_dlp", "file",
                                           "search"]
    assert [registry.get("pruner", n).needs for n in ("magnitude", "wanda", "sparsegpt")] == ["none", "norm", "hessian"]
    assert {n for n in registry.names("allocator") if registry.get("allocator", n).needs == "data"} == {
        "owl", "rmi", "dlp", "lsa", "atp_dlp", "search"}


def test_unknown_names_and_kinds():
    with pytest.raises(UsageError, match="unknown prune method 'obs'; choose from magnitude, wanda, sparsegpt"):
        registry.get("pruner", "obs")
    with pytest.raises(ValueError, match="unknown method kind"):
        registry.register("quantizer", "x")


def test_no_field_is_declared_twice():
    """A setting lives in one config only: the shared ones, PruneConfig's own, and each method's."""
    owners = {}
    configs = [("PruneConfig", PruneConfig), ("Calibration", Calibration)]
    configs += [(f"{kind}:{n}", registry.get(kind, n).config) for kind in ("pruner", "allocator")
                for n in registry.names(kind)]
    for label, cls in configs:
        for f in dataclasses.fields(cls):
            if f.name in ("pruner", "allocator", "calibration"):
                continue
            assert f.name not in owners, f"{f.name} in {owners.get(f.name)} and {label}"
            owners[f.name] = label


def test_a_new_allocator_is_one_registration(monkeypatch, tokenizer):
    """Adding an allocator: a config, one registered function; PruneConfig, the flags and prune find it."""
    from conftest import make_model
    from sparsellm.cli import build_parser
    from sparsellm.pipeline import prune

    registry.names("allocator")
    monkeypatch.setattr(registry, "_METHODS", {k: dict(v) for k, v in registry._METHODS.items()})  # restored after

    @dataclasses.dataclass
    class HalvesConfig:
        halves_spread: float = dataclasses.field(default=0.1, metadata={"help": "spread of the halves"})

        def validate(self, target):
            return self

    @registry.register("allocator", "halves", HalvesConfig)
    def halves(model, calib_ids, target, config, **_):
        return [target - config.halves_spread, target + config.halves_spread], {"spread": config.halves_spread}

    cfg = PruneConfig.from_flat(allocation="halves", halves_spread=0.2, sparsity_ratio=0.5, prune_method="magnitude")
    assert cfg.allocator == HalvesConfig(0.2)
    model = make_model("llama")
    report = prune(model, tokenizer, cfg, progress=False)
    assert report["allocation"]["rates"] == pytest.approx([0.3, 0.7]) and report["allocation"]["spread"] == 0.2
    args = build_parser().parse_args(["prune", "--model", "m", "--allocation", "halves", "--halves_spread", "0.3"])
    assert args.halves_spread == 0.3


@pytest.mark.parametrize("settings,match", [
    ({"allocation": "uniform", "owl_m": 3.0}, "--owl_m applies only to --allocation owl"),
    ({"allocation": "atp", "rmi_delta": 0.01, "rmi_nsamples": 8}, "--rmi_delta, --rmi_nsamples apply only to --allocation rmi"),
    ({"prune_method": "wanda", "blocksize": 64}, "--blocksize applies only to --prune_method sparsegpt"),
    ({"allocation": "uniform", "allow_mean_mismatch": True}, "applies only to --allocation file:PATH"),
    ({"no_such_setting": 1}, "unknown settings: no_such_setting"),
])
def test_settings_of_an_unchosen_method_are_refused(settings, match):
    with pytest.raises(UsageError, match=match):
        PruneConfig.from_flat(**settings)


def test_settings_at_their_defaults_are_accepted_for_any_method():
    cfg = PruneConfig.from_flat(prune_method="wanda", blocksize=128, percdamp=0.01, owl_m=5.0, atp_beta=0.0)
    assert cfg.pruner is not None and not dataclasses.fields(cfg.pruner)  # wanda has no settings of its own


def test_from_flat_splits_settings_and_round_trips():
    cfg = PruneConfig.from_flat(prune_method="sparsegpt", sparsity_ratio=0.6, blocksize=64, percdamp=0.05,
                                allocation="owl", owl_lambda=0.05, nsamples=8, seqlen=32, seed=3)
    assert cfg.pruner == SparseGPTConfig(blocksize=64, percdamp=0.05)
    assert cfg.allocator.owl_lambda == 0.05 and cfg.allocator.owl_m == 5.0
    assert cfg.calibration == Calibration(nsamples=8, seqlen=32, seed=3)
    flat = cfg.validate().to_dict()
    assert PruneConfig.from_flat(**flat).validate() == cfg


@pytest.mark.parametrize("settings,match", [
    ({"prune_method": "sparsegpt", "percdamp": 0.0}, "--percdamp must be > 0"),
    ({"prune_method": "sparsegpt", "blocksize": 0}, "--blocksize must be >= 1"),
    ({"allocation": "owl", "owl_lambda": 0.6}, "OWL λ = 0.6 is outside"),
    ({"allocation": "owl", "owl_m": 0.0}, "--owl_m must be > 0"),
    ({"allocation": "rmi", "rmi_delta": 0.6}, "RMI δ = 0.6"),
    ({"allocation": "rmi", "rmi_nsamples": 2}, "--rmi_nsamples must be >= 3"),
    ({"allocation": "rmi", "rmi_beta": 0.0}, "RMI β must be a positive number"),
    ({"allocation": "atp", "atp_beta": -0.1}, "must be >= 0"),
    ({"allocation": "file:/no/such.json"}, "allocation file not found"),
    ({"nsamples": 0}, "--nsamples must be >= 1"),
    ({"seqlen": 1}, "--seqlen must be >= 2"),
    ({"sparsity_type": "2:4", "allocation": "atp"}, "N:M patterns use uniform allocation"),
])
def test_each_config_validates_its_own_fields(settings, match):
    with pytest.raises(UsageError, match=match):
        PruneConfig.from_flat(**settings).validate()


def test_sparsity_ratio_defaults_and_nm():
    assert PruneConfig().validate().sparsity_ratio == 0.5
    assert PruneConfig(sparsity_type="1:4").validate().sparsity_ratio == 0.75
    with pytest.raises(UsageError, match="contradicts"):
        PruneConfig(sparsity_type="2:4", sparsity_ratio=0.6).validate()


def test_cli_defaults_come_from_the_configs():
    """Each flag's default is the config field's default (written once), for every registered method."""
    from sparsellm.cli import build_parser

    args = vars(build_parser().parse_args(["prune", "--model", "m"]))
    expected = {f.name: f.default for f in dataclasses.fields(Calibration)}
    expected.update({f.name: f.default for f in dataclasses.fields(PruneConfig) if f.metadata.get("help")})
    for kind in ("pruner", "allocator"):
        for n in registry.names(kind):
            expected.update({f.name: f.default for f in dataclasses.fields(registry.get(kind, n).config)
                             if f.metadata.get("flag") != ""})
    for name, default in expected.items():
        assert args[name] == default, name


def test_resolve_allocation_fills_the_defaults_of_an_unvalidated_config():
    """The public example `resolve_allocation(model, PruneConfig(allocation="owl", sparsity_ratio=0.7), calib)`."""
    import torch

    from conftest import make_model
    from sparsellm import resolve_allocation

    model = make_model("llama", num_hidden_layers=3)
    rates, info = resolve_allocation(model, PruneConfig(allocation="atp", sparsity_ratio=0.5), None)
    assert rates == [0.5, 0.5, 0.5] and info["atp_beta"] == 0.0
    rates, info = resolve_allocation(model, PruneConfig(allocation="owl", sparsity_ratio=0.7),
                                     torch.randint(3, 100, (2, 16)), progress=False)
    assert sum(rates) / 3 == pytest.approx(0.7) and all(0.62 - 1e-9 <= r <= 0.78 + 1e-9 for r in rates)
    assert PruneConfig().validate().sparsity_ratio == 0.5
