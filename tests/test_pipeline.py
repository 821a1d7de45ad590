"""pipeline.prune on whole tiny models (what must and must not change), save_pruned round trips through vanilla
transformers, the sidecar's contents, and atomicity of saving."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import sparsellm
from conftest import FAMILIES, make_model
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.runs.rundir import save_pruned
from sparsellm.outputs import umask
from sparsellm.errors import UsageError

LINEAR_NAMES = {
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
}
LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _prefix(model):
    return "model.decoder.layers" if model.config.model_type == "opt" else "model.layers"


def _linear_weight_names(model):
    linears = LINEAR_NAMES.get(model.config.model_type, LLAMA_LINEARS)
    n = model.config.num_hidden_layers
    return {f"{_prefix(model)}.{i}.{lin}.weight" for i in range(n) for lin in linears}


def _calib(n=2, seqlen=32, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _cfg(method, **kw):
    base = dict(prune_method=method, sparsity_ratio=0.5, nsamples=2, seqlen=32,
                **({"blocksize": 16} if method == "sparsegpt" else {}))
    base.update(kw)
    return PruneConfig.from_flat(**base)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_changes_only_block_linears(family, method, tokenizer):
    model = make_model(family)
    before = copy.deepcopy(model)
    report = prune(model, tokenizer, _cfg(method), calib_ids=_calib(), progress=False)
    targets = _linear_weight_names(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    ref = dict(before.named_parameters(remove_duplicate=False))
    assert set(after) == set(ref)
    assert targets <= set(after)
    zeros = total = 0
    for name, p in after.items():
        if name in targets:
            z = int((p == 0).sum())
            zeros += z
            total += p.numel()
            assert z >= p.numel() // 2 - p.shape[0], name  # about half of every linear is zero
            assert not torch.equal(p, ref[name]), name
        else:  # embeddings, norms, lm_head, biases, positional embeddings
            assert torch.equal(p, ref[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, dict(before.named_buffers())[name]), name
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert report["measured"]["zeros"] == zeros
    assert report["measured"]["params"] == total
    assert report["measured"]["sparsity"] == pytest.approx(zeros / total)
    assert report["method"] == method and report["target_sparsity"] == 0.5
    assert {k: v for k, v in report["allocation"].items() if k != "seconds"} == {
        "name": "uniform", "rates": [0.5] * model.config.num_hidden_layers}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_prune_nm_whole_model(method, pattern, tokenizer):
    n, m = map(int, pattern.split(":"))
    model = make_model("qwen2")
    report = prune(model, tokenizer, _cfg(method, sparsity_ratio=None, sparsity_type=pattern),
                   calib_ids=_calib(), progress=False)
    assert report["target_sparsity"] == pytest.approx(1 - n / m)
    for name in _linear_weight_names(model):
        w = model.get_parameter(name)
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups >= m - n).all(), name


def test_prune_unstructured_exact_per_layer(tokenizer):
    model = make_model("llama")
    prune(model, tokenizer, _cfg("magnitude", sparsity_ratio=0.3), calib_ids=_calib(), progress=False)
    for name in _linear_weight_names(model):
        w = model.get_parameter(name)
        assert int((w == 0).sum()) == int(w.numel() * 0.3), name


def test_prune_rejects_bad_config_before_touching_model(tokenizer):
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    for cfg in [_cfg("wanda", sparsity_ratio=1.0), _cfg("wanda", sparsity_type="4:4"),
                _cfg("nope"), _cfg("wanda", sparsity_ratio=0.3, sparsity_type="2:4"),
                _cfg("wanda", sparsity_type="2:3"),  # 32 and 64 are not divisible by 3
                _cfg("wanda", allocation="owl-not-here")]:
        with pytest.raises(UsageError):
            prune(model, tokenizer, cfg, calib_ids=_calib(), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ save + reload


@pytest.mark.parametrize("family", FAMILIES + ["llama_untied"])
def test_save_reload_identical(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = make_model(family)
    report = prune(model, tokenizer, _cfg("wanda"), calib_ids=_calib(), progress=False)
    out = tmp_path / "out"
    save_pruned(model, tokenizer, out, report)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        a = model(ids).logits
        b = loaded(ids).logits
    assert torch.equal(a, b)
    sd_a = model.state_dict()
    sd_b = loaded.state_dict()
    for name in _linear_weight_names(model):
        assert torch.equal(sd_a[name] == 0, sd_b[name] == 0), name
        assert torch.equal(sd_a[name], sd_b[name]), name
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    # (AutoTokenizer maps some model types, e.g. qwen2, to their own tokenizer class; load the saved file as is)
    tok2 = PreTrainedTokenizerFast.from_pretrained(out)
    assert tok2("the film was .").input_ids == tokenizer("the film was .").input_ids
    tokenizer.save_pretrained(tmp_path / "tok_ref")
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((tmp_path / "tok_ref" / "tokenizer.json").read_text())
    assert tok2.eos_token == tokenizer.eos_token
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sparsity_config_sidecar(tokenizer, tmp_path):
    model = make_model("llama")
    calib = _calib()
    report = prune(model, tokenizer, _cfg("sparsegpt", sparsity_ratio=None, sparsity_type="2:4", seed=7),
                   calib_ids=calib, progress=False)
    out = tmp_path / "out"
    save_pruned(model, tokenizer, out, report, run_report={"hello": 1}, markdown="# hi\n")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "sparsity_config.json",
            "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text()) == {"hello": 1}
    assert (out / "report.md").read_text() == "# hi\n"
    sc = json.loads((out / "sparsity_config.json").read_text())
    assert sc["method"] == "sparsegpt"
    assert sc["sparsity_structure"] == "2:4"
    assert sc["target_sparsity"] == pytest.approx(0.5)
    expected_modules = {n[: -len(".weight")] for n in _linear_weight_names(model)}
    assert set(sc["modules"]) == expected_modules
    assert sorted(sc["targets"]) == sorted(expected_modules)
    for name, entry in sc["modules"].items():
        w = model.get_submodule(name).weight
        assert entry["target"] == pytest.approx(0.5)
        assert entry["measured"] == pytest.approx(float((w == 0).sum()) / w.numel())
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in expected_modules)
    total = sum(model.get_submodule(n).weight.numel() for n in expected_modules)
    assert sc["global_sparsity"] == pytest.approx(zeros / total)
    assert {k: v for k, v in sc["allocation"].items() if k != "seconds"} == {"name": "uniform", "rates": [0.5, 0.5]}
    assert sc["calibration"]["nsamples"] == 2 and sc["calibration"]["seqlen"] == 32
    assert sc["calibration"]["seed"] == 7
    import hashlib

    assert sc["calibration"]["tokens_sha256"] == hashlib.sha256(calib.numpy().tobytes()).hexdigest()
    import transformers

    assert sc["versions"]["sparsellm"] == sparsellm.__version__
    assert sc["versions"]["torch"] == torch.__version__
    assert sc["versions"]["transformers"] == transformers.__version__
    assert "python" in sc["versions"]


def test_save_over_existing_dir_replaces_it(tokenizer, tmp_path):
    model = make_model("llama")
    report = prune(model, tokenizer, _cfg("magnitude"), calib_ids=_calib(), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="not empty"):
        save_pruned(model, tokenizer, out, report)
    assert (out / "stale.txt").read_text() == "old"
    save_pruned(model, tokenizer, out, report, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and "model.safetensors" in names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_the_models_own_directory(tokenizer, tmp_path):
    model = make_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    report = prune(model, tokenizer, _cfg("magnitude"), calib_ids=_calib(), progress=False)
    for target in (src, src / "sub", tmp_path):
        with pytest.raises(UsageError, match="overlaps"):
            save_pruned(model, tokenizer, target, report, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_saved_files_are_world_readable(tokenizer, tmp_path):
    model = make_model("llama")
    report = prune(model, tokenizer, _cfg("magnitude"), calib_ids=_calib(), progress=False)
    out = save_pruned(model, tokenizer, tmp_path / "out", report)
    assert out.stat().st_mode & 0o055 == 0o055 & ~umask()
    for name in ("sparsity_config.json", "report.json", "report.md"):
        assert (out / name).stat().st_mode & 0o044 == 0o044 & ~umask()


# ------------------------------------------------------------------ atomicity


class Boom(RuntimeError):
    pass


def _snapshot(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("what", ["model", "tokenizer", "sidecar"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(what, existing, tokenizer, tmp_path, monkeypatch):
    model = make_model("llama")
    report = prune(model, tokenizer, _cfg("magnitude"), calib_ids=_calib(), progress=False)
    tok = copy.deepcopy(tokenizer)
    out = tmp_path / "parent" / "out"
    out.parent.mkdir()
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous run")
        (out / "sub").mkdir()
        (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = _snapshot(tmp_path)

    if what == "model":
        real = model.save_pretrained

        def failing(d, *a, **k):
            real(d, *a, **k)  # write a partial directory first, then fail
            raise Boom("disk full")

        monkeypatch.setattr(model, "save_pretrained", failing)
    elif what == "tokenizer":
        def failing(d, *a, **k):
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                f.write("{")  # a partial file, then fail
            raise Boom("disk full")

        monkeypatch.setattr(tok, "save_pretrained", failing)
    else:
        monkeypatch.setattr(sparsellm.pipeline, "sparsity_sidecar", lambda *a, **k: (_ for _ in ()).throw(Boom("x")))

    with pytest.raises(Boom):
        save_pruned(model, tok, out, report, overwrite=existing)
    assert _snapshot(tmp_path) == before
    if not existing:
        assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
