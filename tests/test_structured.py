"""Structured pruning on tiny models (issue 6): removing heads and channels equals masking them, GQA shapes
stay valid in both modes, FLAP's bias compensation equals feeding the removed channels their mean, the
importance metrics match direct computations, and save/reload gives identical logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_model, sentences
from sparsellm.data import calibration_windows
from sparsellm.errors import UsageError
from sparsellm.models import get_blocks, load_model, load_structured
from sparsellm.structured import geometry, importance, plan_block, prune_structured, struct_spec
from sparsellm.structured.io import write_structured

FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]


@pytest.fixture
def calib(tokenizer, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(sentences(200)))
    return calibration_windows(tokenizer, str(p), 4, 32, 0)


def _masked_reference(model, plans, mean_inputs=None):
    """The dense model with the removed heads' o_proj inputs and removed channels' down_proj inputs set to
    zero (or, with mean_inputs, to each channel's calibration mean: what bias compensation stands for)."""
    spec = struct_spec(model)
    hooks = []
    for i, (block, keep) in enumerate(zip(get_blocks(model), plans)):
        n_q, _, hd = geometry(model, block)
        drop_o = torch.ones(n_q * hd, dtype=torch.bool)
        for h in keep["q"]:
            drop_o[h * hd:(h + 1) * hd] = False
        drop_d = torch.ones(block.get_submodule(spec.down).in_features, dtype=torch.bool)
        drop_d[keep["channels"]] = False

        def make(drop, mean):
            def pre(mod, args):
                x = args[0].clone()
                x[..., drop] = 0 if mean is None else mean[drop].to(x.dtype)
                return (x,)
            return pre

        mo = md = None
        if mean_inputs is not None:
            mo, md = mean_inputs[i]
        hooks.append(block.get_submodule(spec.o).register_forward_pre_hook(make(drop_o, mo)))
        hooks.append(block.get_submodule(spec.down).register_forward_pre_hook(make(drop_d, md)))
    return hooks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", ["query", "group"])
def test_removing_equals_masking_and_gqa_shapes_stay_valid(family, gqa, calib):
    dense = make_model(family)
    imp = importance(dense, calib, "wanda-sp", progress=False)
    rates = [0.5, 0.25, 0.4][:len(get_blocks(dense))]
    pruned = copy.deepcopy(dense)
    rep = prune_structured(pruned, rates, imp, gqa=gqa)
    plans = []
    for i, block in enumerate(get_blocks(dense)):
        n_q, n_kv, _ = geometry(dense, block)
        plans.append(plan_block(imp["scores"][i], n_q, n_kv, rates[i], gqa))
    for b, keep in zip(rep["blocks"], plans):
        assert b["heads"] == len(keep["q"]) and b["kv_heads"] == len(keep["kv"])
        assert b["heads"] % b["kv_heads"] == 0
    if gqa == "query":
        assert all(b["kv_heads"] == 2 for b in rep["blocks"]) and rep["blocks"][0]["heads"] == 2
    else:
        assert rep["blocks"][0]["kv_heads"] == 1 and rep["blocks"][0]["heads"] == 2
    assert rep["params_after"] < rep["params_before"]
    x = torch.randint(3, 100, (2, 20))
    hooks = _masked_reference(dense, plans)
    with torch.no_grad():
        want = dense(x).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        got = pruned(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    out = pruned.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)  # KV cache per-block widths
    nocache = pruned.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, nocache)


def test_flap_bias_compensation_equals_mean_inputs(calib):
    dense = make_model("llama")
    imp = importance(dense, calib, "flap", progress=False)
    rates = [0.5, 0.25]
    pruned = copy.deepcopy(dense)
    rep = prune_structured(pruned, rates, imp)
    assert rep["bias_compensation"]
    spec = struct_spec(dense)
    # the reference's means come straight from a forward over the calibration windows, not from imp
    sums = {}

    def grab(name):
        def pre(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s, n = sums.get(name, (0, 0))
            sums[name] = (s + x.sum(0), n + x.shape[0])
        return pre

    hooks = [b.get_submodule(n).register_forward_pre_hook(grab((i, n)))
             for i, b in enumerate(get_blocks(dense)) for n in (spec.o, spec.down)]
    with torch.no_grad():
        for row in calib:
            dense(row[None])
    for h in hooks:
        h.remove()
    means = [tuple(sums[(i, n)][0] / sums[(i, n)][1] for n in (spec.o, spec.down)) for i in range(2)]
    plans = [plan_block(imp["scores"][i], *geometry(dense, b)[:2], rates[i], "query")
             for i, b in enumerate(get_blocks(dense))]
    hooks = _masked_reference(dense, plans, means)
    x = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        want = dense(x).logits
        got = pruned(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_importance_metrics_match_direct_computation(calib):
    model = make_model("llama")
    spec = struct_spec(model)
    xs = []
    h = get_blocks(model)[1].get_submodule(spec.o).register_forward_pre_hook(lambda m, a: xs.append(a[0][0]))
    with torch.no_grad():
        for row in calib:
            model(row[None])
    h.remove()
    X = torch.cat(xs).double()  # (tokens, C_in) of block 1's o_proj, from full-model forwards
    W = get_blocks(model)[1].get_submodule(spec.o).weight.double()
    n_q, _, hd = geometry(model, get_blocks(model)[1])
    want = {
        "wanda-sp": (W.abs() * X.norm(dim=0)).mean(0),
        "magnitude-sp": W.norm(dim=0),
        "flap": X.var(dim=0, unbiased=False) * (W ** 2).sum(0),
    }
    for metric, ch in want.items():
        got = importance(model, calib if metric != "magnitude-sp" else None, metric, progress=False)
        torch.testing.assert_close(got["scores"][1]["heads"], ch.reshape(n_q, hd).sum(1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rates,vanilla", [([0.5, 0.5], True), ([0.5, 0.25], False), ([0.0, 0.5], False)])
@pytest.mark.parametrize("metric", ["wanda-sp", "flap"])
def test_save_reload_identical_logits(tmp_path, tokenizer, calib, rates, vanilla, metric):
    from transformers import AutoModelForCausalLM

    model = make_model("llama")
    imp = importance(model, calib, metric, progress=False)
    prune_structured(model, rates, imp)
    x = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        want = model(x).logits
    d = tmp_path / "m"
    d.mkdir()
    info = write_structured(model, d)
    tokenizer.save_pretrained(d)
    assert info["vanilla_loadable"] is vanilla
    assert [b["intermediate_size"] for b in info["blocks"]] == [round(64 * (1 - r)) for r in rates]
    spec = struct_spec(model)
    for r, blk in zip(rates, get_blocks(model)):  # FLAP's compensation bias only where something was removed
        assert (blk.get_submodule(spec.down).bias is not None) == (metric == "flap" and r > 0)
    back, _, _ = load_model(str(d))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=1e-6, rtol=0)
    assert json.loads((d / "structure.json").read_text())["blocks"] == info["blocks"]
    if vanilla:  # plain transformers, no sparsellm
        plain = AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, want, atol=1e-6, rtol=0)
    else:
        with pytest.raises(RuntimeError, match="mismatch"):
            AutoModelForCausalLM.from_pretrained(d)  # widths differ from config.json: loud, never silent


def test_bad_input(calib):
    with pytest.raises(UsageError, match="structured pruning supports"):
        importance(make_model("opt"), calib, "wanda-sp", progress=False)
    model = make_model("llama")
    with pytest.raises(UsageError, match="unknown importance metric"):
        importance(model, calib, "taylor", progress=False)
    imp = importance(model, None, "magnitude-sp", progress=False)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        prune_structured(model, [1.0, 0.0], imp)
    with pytest.raises(UsageError, match="gqa"):
        prune_structured(model, [0.5, 0.0], imp, gqa="heads")


def test_structure_json_mismatch_is_an_error(tmp_path, calib):
    model = make_model("llama")
    prune_structured(model, [0.5, 0.25], importance(model, None, "magnitude-sp", progress=False))
    write_structured(model, tmp_path)
    info = json.loads((tmp_path / "structure.json").read_text())
    info["blocks"][1]["intermediate_size"] = 40
    (tmp_path / "structure.json").write_text(json.dumps(info))
    with pytest.raises(UsageError, match="do not match"):
        load_structured(tmp_path)
