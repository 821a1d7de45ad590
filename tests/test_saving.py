"""Nothing lost, nothing silent when saving (issue 20): a structurally pruned GQA model is always saved (a plain
config where transformers can express it, structure.json alone otherwise) and a failed save leaves the search
resumable; adapters left attached are refused and a checkpoint missing weights is not loaded at random; every
output file has the umask's mode; weights are saved in the dtype asked for, zeros exact."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config, make_model
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.models import load_model
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.runs.rundir import save_pruned
from sparsellm.structured import importance, prune_structured
from sparsellm.structured.io import write_structured

# Llama-3-8B's ratio of heads to width: head_dim 8, 32 query heads sharing 8 KV heads (G = 4)
GQA = dict(hidden_size=256, num_attention_heads=32, num_key_value_heads=8, intermediate_size=64)


def _calib(n=2, seqlen=16):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _expressible(family: str, n_q: int, inter: int) -> bool:
    """Independent of sparsellm: does the family's own config class accept these widths with head_dim 8?"""
    d = {**make_config(family, **GQA).to_dict(), "num_attention_heads": n_q, "head_dim": 8,
         "intermediate_size": inter}
    try:
        type(make_config(family)).from_dict(d)
        return True
    except Exception:  # noqa: BLE001  transformers' validation error, whatever its class
        return False


# ------------------------------------------------------------------ item 1: structured GQA models are saved


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_uniform_gqa_widths_are_saved_and_load_with_equal_logits(tmp_path, tokenizer, family, rate):
    from transformers import AutoModelForCausalLM

    model = make_model(family, **GQA)
    prune_structured(model, [rate, rate], importance(model, None, "magnitude-sp", progress=False))
    n_q = 8 * (4 - int(rate * 4 + 0.5))  # every KV group of 4 query heads loses round(rate * 4)
    inter = 64 - int(rate * 64 + 0.5)
    x = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        want = model(x).logits
    d = tmp_path / "m"
    d.mkdir()
    info = write_structured(model, d)
    tokenizer.save_pretrained(d)
    assert info["blocks"][0] == {"num_attention_heads": n_q, "num_key_value_heads": 8, "head_dim": 8,
                                 "intermediate_size": inter}
    vanilla = _expressible(family, n_q, inter)
    assert info["vanilla_loadable"] is vanilla
    if family == "llama" and rate == 0.25:  # hidden 256, 24 heads: LlamaConfig refuses it, even with head_dim
        assert not vanilla and "multiple" in info["why_not_vanilla"]
    back, _, _ = load_model(str(d))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=1e-6, rtol=0)
    if vanilla:
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["num_attention_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (n_q, 8, inter)
        plain = AutoModelForCausalLM.from_pretrained(d)  # plain transformers, no sparsellm
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, want, atol=1e-6, rtol=0)
    else:
        with pytest.raises(Exception, match="mismatch|multiple"):  # loud, never random weights
            AutoModelForCausalLM.from_pretrained(d)


def _search(model_dir, out, *extra):
    return main(["--quiet", "search", "--model", str(model_dir), "--target_rate", "0.25", "--max_rate", "0.5",
                 "--population", "4", "--generations", "2", "--crossover", "2", "--mutation", "2",
                 "--nsamples", "2", "--seqlen", "16", "--fitness_windows", "1", "--fitness_seqlen", "16",
                 "--final_k", "1", "--eval", "none", "--out", str(out), *extra])


def test_cli_uniform_search_of_a_gqa_model_saves_it(tmp_path, tokenizer):
    src = tmp_path / "gqa"
    make_model("llama", **GQA).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert _search(src, tmp_path / "s", "--backend", "uniform") == 0
    info = json.loads((tmp_path / "s" / "structure.json").read_text())
    assert [b["num_attention_heads"] for b in info["blocks"]] == [24, 24]
    model, _, _ = load_model(str(tmp_path / "s"))
    assert model.model.layers[0].self_attn.q_proj.out_features == 24 * 8


def test_a_failed_save_leaves_the_search_resumable(tmp_path, saved_model_dir, monkeypatch, caplog):
    import sparsellm.selfpruner.driver as driver
    import sparsellm.structured.io as io

    calls = []
    real_ppl, real_write = driver.perplexity, io.write_structured
    monkeypatch.setattr(driver, "perplexity", lambda *a, **k: calls.append(1) or real_ppl(*a, **k))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_structured", broken)
    out = tmp_path / "s"
    with caplog.at_level(logging.ERROR, logger="sparsellm"):
        assert _search(saved_model_dir, out, "--backend", "ga") == 1  # OSError: one line, exit 1
    assert not out.exists()
    state = json.loads((tmp_path / "s.search" / "state.json").read_text())
    assert state["generation"] == 2 and calls  # the whole search ran, then the save failed
    assert "--resume" in caplog.text and str(tmp_path / "s.search") in caplog.text
    monkeypatch.setattr(io, "write_structured", real_write)
    calls.clear()
    assert _search(saved_model_dir, out, "--backend", "ga", "--resume") == 0
    assert calls == []  # resumed from the state: no fitness evaluated again
    rep = json.loads((out / "report.json").read_text())["search"]
    assert rep["best_rates"] == state["population"][0]["rates"]
    assert rep["evals"] == state["evals"] and not (tmp_path / "s.search").exists()


def test_structured_save_in_bfloat16(tmp_path, tokenizer):
    model = make_model("llama", **GQA)
    prune_structured(model, [0.25, 0.5], importance(model, None, "magnitude-sp", progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_structured(model, tmp_path, save_dtype="bfloat16")
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back, _, _ = load_model(str(tmp_path))
    saved = back.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])  # the in-memory model is unchanged
        assert torch.equal(saved[k], v.to(torch.bfloat16).float()), k


# ------------------------------------------------------------------ item 4: adapters, missing weights


def _pruned(tokenizer, family="llama"):
    model = make_model(family)
    report = prune(model, tokenizer, PruneConfig(prune_method="magnitude", sparsity_ratio=0.5), calib_ids=_calib(),
                   progress=False)
    return model, report


def test_saving_with_adapters_attached_is_refused_then_merged_saves(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from sparsellm.adapt import add_masked_lora, remove_adapters

    model, report = _pruned(tokenizer)
    layers = add_masked_lora(model, r=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(1)
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    # the merge, written here: W + (alpha / r) * (B @ A) * (W != 0)
    merged = {id(layer): layer.base.weight + 2.0 * (layer.lora_B @ layer.lora_A) * (layer.base.weight != 0)
              for layer in layers}
    with pytest.raises(UsageError, match="adapter layers attached.*remove_adapters"):
        save_pruned(model, tokenizer, tmp_path / "out", report)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    bases = {id(layer): layer.base for layer in layers}
    remove_adapters(model)
    save_pruned(model, tokenizer, tmp_path / "out", report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key, base in bases.items():
        name = next(n for n, m in model.named_modules() if m is base)
        torch.testing.assert_close(plain.get_submodule(name).weight, merged[key], atol=1e-6, rtol=0)


def test_a_checkpoint_missing_weights_is_not_loaded_at_random(tmp_path, tokenizer, capsys):
    from sparsellm.adapt import add_masked_lora

    model = make_model("llama")
    add_masked_lora(model)
    d = tmp_path / "broken"
    model.save_pretrained(d)  # what an unguarded save wrote: q_proj.base.weight, q_proj.lora_A, ...
    tokenizer.save_pretrained(d)
    with pytest.raises(UsageError, match="lacks 14 weights.*random"):
        load_model(str(d))
    capsys.readouterr()
    assert main(["--quiet", "eval", "ppl", "--model", str(d), "--max_windows", "1", "--seqlen", "16"]) == 2
    err = capsys.readouterr().err
    assert "sparsellm: error:" in err and "random" in err and "Traceback" not in err


# ------------------------------------------------------------------ item 17: modes follow the umask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_output_of_a_prune_run_follows_the_umask(tmp_path, saved_model_dir, calib_txt, mask):
    out, reports = tmp_path / "deep" / "out", tmp_path / "reports"
    old = os.umask(mask)
    try:
        code = main(["--quiet", "prune", "--model", str(saved_model_dir), "--prune_method", "wanda",
                     "--calib_dataset", str(calib_txt), "--nsamples", "2", "--seqlen", "16", "--diag_nsamples", "1",
                     "--eval", "none", "--out", str(out), "--save", str(reports)])
    finally:
        os.umask(old)
    assert code == 0
    paths = [out, out.parent, reports, *out.rglob("*"), *reports.rglob("*")]
    assert {"model.safetensors", "config.json", "errors.png", "report.json"} <= {p.name for p in paths}
    assert (reports / "errors.png").is_file()
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------------ item 18: the saved dtype


@pytest.fixture
def bf16_dir(tmp_path, tokenizer):
    """A tiny llama checkpoint that declares (and holds) bfloat16 weights."""
    d = tmp_path / "bf16"
    make_model("llama").to(torch.bfloat16).save_pretrained(d)
    tokenizer.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    return d


@pytest.mark.parametrize("save_dtype,want", [("auto", torch.bfloat16), ("float16", torch.float16),
                                             ("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_save_dtype(tmp_path, bf16_dir, save_dtype, want):
    from transformers import AutoModelForCausalLM

    model, tok, _ = load_model(str(bf16_dir))  # float32 in memory
    report = prune(model, tok, PruneConfig(prune_method="magnitude", sparsity_ratio=0.5), calib_ids=_calib(),
                   progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_pruned(model, tok, tmp_path / "out", report, save_dtype=save_dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    saved = load_file(str(out / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k  # the in-memory model is unchanged
        if k in saved:  # (a tied lm_head is stored once)
            assert saved[k].dtype == want and torch.equal(saved[k], v.to(want)), k
            if k.endswith("proj.weight"):
                assert torch.equal(saved[k] == 0, v == 0), k  # zeros exact, and no new ones
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.dtype == want
    for k, v in plain.state_dict().items():
        assert torch.equal(v, before[k].to(want)), k


def test_cli_save_dtype_flag(tmp_path, bf16_dir, capsys, monkeypatch):
    base = ["--quiet", "prune", "--model", str(bf16_dir), "--prune_method", "magnitude", "--eval", "none"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([*base, "--out", str(tmp_path / "b"), "--save_dtype", "float16"]) == 0
    assert load_file(str(tmp_path / "b" / "model.safetensors"))["model.norm.weight"].dtype == torch.float16
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c"), "--save_dtype", "float64"]) == 2
    assert "--save_dtype" in capsys.readouterr().err and not (tmp_path / "c").exists()

    import sparsellm.models.load as load  # a GGUF source (quantized weights) declares bfloat16

    monkeypatch.setattr(load, "resolve_model", lambda spec: ("gguf", bf16_dir))
    monkeypatch.setattr(load, "_gguf_to_hf_dir", lambda path: path)
    model, _, _ = load.load_model("x.gguf")
    assert model.sparsellm_declared_dtype == "bfloat16"
