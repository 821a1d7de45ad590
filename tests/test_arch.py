"""The one architecture table (`sparsellm.models.arch.ARCHITECTURES`): every family's roles resolve on a tiny
model, the attention layout matches the configs, and structured pruning and ONNX export take their lists of
supported families from the table's flags and nowhere else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_model
from sparsellm.errors import UsageError
from sparsellm.evaluate.onnx_export import check_exportable
from sparsellm.models import ARCHITECTURES, ROLES, Arch, families, get_arch, get_blocks
from sparsellm.models.arch import block_linears
from sparsellm.structured import struct_spec


def _widths(model):
    """(query heads, KV heads, head_dim, MLP intermediate size) from the config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    return heads, kv, hd, inter


def test_every_family_resolves_its_roles(family):
    model = make_model(family)
    arch = get_arch(model)
    assert list(arch.roles) == [r for r in ROLES if r in arch.roles]  # roles in the canonical order
    assert set(arch.roles) >= {"q", "k", "v", "o", "up", "down"}
    heads, kv, hd, inter = _widths(model)
    hidden = model.config.hidden_size
    # each role names the linear of that shape: (in_features, out_features)
    shapes = {"q": (hidden, heads * hd), "k": (hidden, kv * hd), "v": (hidden, kv * hd), "o": (heads * hd, hidden),
              "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    for block in get_blocks(model):
        for role, name in arch.roles.items():
            lin = block.get_submodule(name)
            assert isinstance(lin, torch.nn.Linear), (family, role, name)
            assert (lin.in_features, lin.out_features) == shapes[role], (family, role, name)
        assert list(block_linears(model, block)) == list(arch.roles.values())
    # a forward calls the linears in role order (q, k, v, o, gate, up, down): the roles are not swapped
    calls = []
    hooks = [block.get_submodule(name).register_forward_hook(lambda *a, role=role: calls.append(role))
             for block in get_blocks(model) for role, name in arch.roles.items()]
    model(torch.arange(6)[None])
    for h in hooks:
        h.remove()
    assert calls == list(arch.roles) * len(get_blocks(model))


def test_block_linears_order_is_the_report_order():
    llama, opt = make_model("llama"), make_model("opt")
    assert list(block_linears(llama, get_blocks(llama)[0])) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(block_linears(opt, get_blocks(opt)[0])) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    assert "gate" not in ARCHITECTURES["opt"].roles


def test_attention_layout_matches_the_configs(family):
    model = make_model(family)
    att = get_arch(model).attention
    cfg = model.config
    for block in get_blocks(model):
        assert block.get_submodule(att.path) is not None
    assert att.kv_heads == hasattr(cfg, "num_key_value_heads")
    assert att.positions in ("rotary", "learned")
    learned = any(n.endswith("embed_positions") for n, _ in model.named_modules())
    assert (att.positions == "learned") == learned
    assert att.sliding_window == hasattr(cfg, "sliding_window")


def test_capability_flags():
    assert families("structured") == ["gemma3_text", "llama", "mistral", "qwen2"]
    assert families("onnx") == ["llama", "mistral", "qwen2"]


def test_struct_spec_follows_the_roles():
    spec = struct_spec(make_model("gemma3"))
    assert (spec.attn, spec.q, spec.k, spec.v, spec.o, spec.up, spec.down) == (
        "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")


def test_struct_spec_refuses_opt():
    with pytest.raises(UsageError, match=r"structured pruning supports gemma3_text, llama, mistral, qwen2; not 'opt'"):
        struct_spec(make_model("opt"))


@pytest.mark.parametrize("family,model_type", [("gemma3", "gemma3_text"), ("opt", "opt")])
def test_check_exportable_refuses_gemma3_and_opt(family, model_type):
    with pytest.raises(UsageError, match=rf"supports llama, mistral, qwen2 models, not '{model_type}'"):
        check_exportable(make_model(family))


def test_the_table_is_the_only_list_of_families(monkeypatch):
    model = make_model("llama")
    model.config.model_type = "fake_llama"
    for check in (struct_spec, check_exportable, get_blocks):
        with pytest.raises(UsageError, match="fake_llama"):
            check(model)
    monkeypatch.setitem(ARCHITECTURES, "fake_llama", ARCHITECTURES["llama"])
    assert struct_spec(model) == struct_spec(make_model("llama"))
    check_exportable(model)
    assert get_blocks(model) is model.model.layers
    # flags, not names, decide: turn structured pruning off for llama and on for OPT, ONNX on for Gemma 3
    monkeypatch.setitem(ARCHITECTURES, "llama", dataclasses.replace(ARCHITECTURES["llama"], structured=False))
    monkeypatch.setitem(ARCHITECTURES, "opt", dataclasses.replace(ARCHITECTURES["opt"], structured=True))
    monkeypatch.setitem(ARCHITECTURES, "gemma3_text", dataclasses.replace(ARCHITECTURES["gemma3_text"], onnx=True))
    with pytest.raises(UsageError, match=r"supports fake_llama, gemma3_text, mistral, opt, qwen2; not 'llama'"):
        struct_spec(make_model("llama"))
    spec = struct_spec(make_model("opt"))
    assert (spec.o, spec.up, spec.down) == ("self_attn.out_proj", ("fc1",), "fc2")
    check_exportable(make_model("gemma3"))
    with pytest.raises(UsageError, match=r"supports fake_llama, gemma3_text, llama, mistral, qwen2 models"):
        check_exportable(make_model("opt"))


def test_arch_checks_its_roles():
    llama = ARCHITECTURES["llama"]
    with pytest.raises(ValueError, match="unknown linear roles"):
        Arch(llama.blocks, {"qkv": "self_attn.qkv_proj"}, llama.attention, structured=False, onnx=False)
    with pytest.raises(TypeError):
        llama.roles["q"] = "x"  # the table cannot be edited by accident


def test_cache_kwarg_names_the_forwards_cache_argument():
    import inspect

    from sparsellm.evaluate.speed import cache_kwarg

    model = make_model("llama")
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values"
