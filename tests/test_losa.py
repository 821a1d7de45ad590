"""LoSA's driver and its baselines on tiny models (issue 4): re-pruning the merged weights keeps the
pruner's result exactly, the per-block error matches its formula, a LoSA run keeps the exact sparsity
and lowers the loss, resume equals an uninterrupted run, adapters round-trip through peft's layout, and
`sparsellm finetune` rejects bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, drop_unchosen, make_model, sentences
from sparsellm.adapt import FinetuneConfig, add_masked_lora, finetune, merge, set_ranks, unmerge
from sparsellm.adapt import driver
from sparsellm.adapt.adapter_io import load_adapter, save_adapter
from sparsellm.adapt.losa import data_slices, normalised_error
from sparsellm.adapt.masked_lora import MaskedLoraLinear, lora_layers, remove_adapters, unwrapped
from sparsellm.adapt.schedule import cubic_schedule
from sparsellm.adapt.train import text_examples
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.cli import main
from sparsellm.engine import linear_sparsity
from sparsellm.errors import UsageError
from sparsellm.models import block_linears, get_blocks


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


def cfg(corpus, **kw):
    base = dict(method="losa", sparsity_ratio=0.5, prune_method="wanda", steps=3, nsamples=4, seqlen=32,
                calib_dataset=str(corpus), rmi_nsamples=4, rank_nsamples=4, lora_r=4, lora_alpha=8.0,
                lora_dropout=0.0, r_max=8, rank_start=2, rank_end=6, lr=2e-2, ft_batch_size=2, grad_accum=1,
                warmup_ratio=0.0, max_grad_norm=1.0, step_eval_windows=0)
    base.update(kw)
    return FinetuneConfig.from_flat(**base)


def mean_loss(model, examples) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=x[None], labels=y[None]).loss) for x, y in examples) / len(examples)


def test_normalised_error_matches_its_formula():
    torch.manual_seed(0)
    Y, Yh = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    nu = [sum(float(Y[a, b, h]) ** 2 for a in range(2) for b in range(3)) ** 0.5 for h in range(4)]
    want = sum(((float(Y[a, b, h]) - float(Yh[a, b, h])) / nu[h]) ** 2
               for a in range(2) for b in range(3) for h in range(4)) / 4
    assert normalised_error(Y, Yh) == pytest.approx(want, rel=1e-5)
    assert normalised_error(Y, Y) == 0.0


def test_data_slices_partition():
    s = data_slices(11, 3)
    assert [i for a, b in s for i in range(a, b)] == list(range(11)) and all(b > a for a, b in s)
    with pytest.raises(UsageError, match="own slice"):
        data_slices(2, 3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reprune_of_merged_weights_is_kept_exactly(method, tokenizer, corpus):
    """One LoSA re-pruning: merge, prune the merged weights, take the new mask, unmerge. Merging again
    must give back exactly the pruner's output (SparseGPT's weight updates kept), and the base weight
    must be zero wherever the pruner put a zero."""
    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.3, nsamples=4, seqlen=32,
                                        calib_dataset=str(corpus), diag_nsamples=0), progress=False)
    add_masked_lora(model, r=4, alpha=8, dropout=0.0, r_max=8)
    torch.manual_seed(1)
    for m in lora_layers(model):
        m.lora_B.data.normal_(0, 0.05)
    merge(model)
    with unwrapped(model):
        prune(model, tokenizer, PruneConfig.from_flat(prune_method=method, sparsity_ratio=0.6, nsamples=4, seqlen=32,
                                            calib_dataset=str(corpus), diag_nsamples=0), progress=False)
        pruned = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    for m in lora_layers(model):
        m.refresh_mask()
    unmerge(model)
    for name, m in model.named_modules():
        if isinstance(m, MaskedLoraLinear):
            ref = pruned[f"{name}.weight"]
            assert bool((m.base.weight[ref == 0] == 0).all())
    merge(model)
    for name, m in model.named_modules():
        if isinstance(m, MaskedLoraLinear):
            torch.testing.assert_close(m.base.weight, pruned[f"{name}.weight"], atol=1e-6, rtol=0)


def test_merge_that_would_break_the_mask_raises():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[:, :4] = 0
    layer = MaskedLoraLinear(lin, r=2, alpha=4, dropout=0.0)
    layer.lora_B.data.normal_()
    layer.merge()
    assert bool((lin.weight[:, :4] == 0).all())
    layer.unmerge()
    with torch.no_grad():
        lin.weight[0, 0] = 1.0  # a non-zero outside the mask: merging must not hide it
    with pytest.raises(RuntimeError, match="outside the sparsity mask"):
        layer.merge()


@pytest.mark.parametrize("family", FAMILIES)
def test_losa_run_keeps_exact_sparsity_and_lowers_loss(family, tokenizer, corpus):
    model = make_model(family)
    ex = text_examples(tokenizer, str(corpus), 24, 32, seed=1)
    none = make_model(family)
    finetune(none, tokenizer, cfg(corpus, method="none"), ex, progress=False)
    c = cfg(corpus)
    rep = finetune(model, tokenizer, c, ex, progress=False)
    assert not lora_layers(model) and all(type(m).__name__ != "MaskedLoraLinear" for m in model.modules())
    assert [s["target"] for s in rep["steps"]] == pytest.approx(cubic_schedule(0.5, 3))
    last = rep["steps"][-1]
    assert rep["measured"]["sparsity"] == last["measured"]  # the merge kept every zero of the last prune
    assert abs(rep["measured"]["sparsity"] - 0.5) < 0.02
    L = len(get_blocks(model))
    for s in rep["steps"]:
        assert sum(s["ranks"]) == round(s["mean_rank"] * L) and all(1 <= r <= 8 for r in s["ranks"])
        assert len(s["rates"]) == L and sum(s["rates"]) / L == pytest.approx(s["target"], abs=1e-9)
    assert [s["data_slice"] for s in rep["steps"]] == [list(x) for x in data_slices(24, 3)]
    assert mean_loss(model, ex) < mean_loss(none, ex) - 0.05


def _interrupt_second_step(monkeypatch):
    """Make LoSA's second fine-tuning step raise KeyboardInterrupt (as Ctrl-C would); returns the real train."""
    real, calls = driver.train, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(driver, "train", interrupted)
    return real


def test_resume_equals_an_uninterrupted_run(tmp_path, tokenizer, corpus, monkeypatch):
    ex = text_examples(tokenizer, str(corpus), 12, 32, seed=1)
    c = dict(lora_dropout=0.1)  # dropout: the restored RNG state matters
    a = make_model("llama")
    finetune(a, tokenizer, cfg(corpus, **c), ex, checkpoint_dir=tmp_path / "a", model_id="m", progress=False)

    real = _interrupt_second_step(monkeypatch)
    b = make_model("llama")
    with pytest.raises(KeyboardInterrupt):
        finetune(b, tokenizer, cfg(corpus, **c), ex, checkpoint_dir=tmp_path / "b", model_id="m", progress=False)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 1
    monkeypatch.setattr(driver, "train", real)
    b = make_model("llama", seed=5)  # the checkpoint, not the fresh model's init, decides the result
    with pytest.raises(UsageError, match="other settings.*lr"):
        finetune(make_model("llama"), tokenizer, cfg(corpus, lr=1e-3, **c), ex, checkpoint_dir=tmp_path / "b",
                 resume=True, model_id="m", progress=False)
    b = make_model("llama")
    rep = finetune(b, tokenizer, cfg(corpus, **c), ex, checkpoint_dir=tmp_path / "b", resume=True, model_id="m",
                   progress=False)
    assert [s["step"] for s in rep["steps"]] == [1, 2, 3]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    with pytest.raises(UsageError, match="no checkpoint"):
        finetune(make_model("llama"), tokenizer, cfg(corpus, **c), ex, checkpoint_dir=tmp_path / "c", resume=True,
                 progress=False)


def test_baselines(tokenizer, corpus):
    ex = text_examples(tokenizer, str(corpus), 8, 32, seed=1)
    ref = make_model("llama")
    prune(ref, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, nsamples=4, seqlen=32,
                                      calib_dataset=str(corpus), diag_nsamples=0), progress=False)
    none = make_model("llama")
    finetune(none, tokenizer, cfg(corpus, method="none"), ex, progress=False)
    for p, q in zip(ref.parameters(), none.parameters()):
        assert torch.equal(p, q)  # "none" is the plain uniform prune
    zeros = {n: p == 0 for n, p in ref.named_parameters() if p.dim() == 2}
    masked = make_model("llama")
    rep = finetune(masked, tokenizer, cfg(corpus, method="masked-lora"), ex, progress=False)
    assert rep["measured"]["sparsity"] == linear_sparsity(ref)["sparsity"] and rep["ranks"] == [4, 4]
    for n, p in masked.named_parameters():
        if n in zeros:
            assert bool((p[zeros[n]] == 0).all())
    assert any(not torch.equal(p, q) for p, q in zip(masked.parameters(), ref.parameters()))  # it trained
    lora = make_model("llama")
    rep = finetune(lora, tokenizer, cfg(corpus, method="lora"), ex, progress=False)
    assert type(lora).__name__ == "LlamaForCausalLM" and rep["measured"]["sparsity"] < 0.01  # dense again
    again = finetune(ref, tokenizer, cfg(corpus, method="none"), ex, progress=False)
    assert again["prune"] is None  # already that sparse: not pruned again


def test_adapter_round_trip_and_peft_layout(tmp_path, tokenizer, corpus):
    from peft import PeftModel

    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, nsamples=4, seqlen=32,
                                        calib_dataset=str(corpus), diag_nsamples=0), progress=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_masked_lora(model, r=4, alpha=8, dropout=0.0, r_max=8)
    torch.manual_seed(0)
    for m in lora_layers(model):
        m.lora_B.data.normal_(0, 0.1)
    set_ranks(model, [3, 7])
    x = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        want = model(x).logits
    merge(model)
    save_adapter(model, tmp_path / "ad", "base-id")
    remove_adapters(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    load_adapter(model, tmp_path / "ad")
    unmerge(model)
    for n, p in model.named_parameters():
        if n.replace(".base", "") in base and "lora" not in n:
            torch.testing.assert_close(p, base[n.replace(".base", "")], atol=1e-6, rtol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=1e-5)
    # peft reads the layout: per-block ranks and a scaling equal to α/r
    plain = make_model("llama")
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    pm = PeftModel.from_pretrained(plain, str(tmp_path / "ad"))
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert q.lora_A["default"].weight.shape[0] == 7 and q.scaling["default"] == pytest.approx(8 / 4)
    assert json.loads((tmp_path / "ad" / "sparsellm_adapter.json").read_text())["merged_into_base"] is True


# ------------------------------------------------------------------------------------------------------ CLI


def _cli(model_dir, corpus, out, *extra):
    return main(drop_unchosen(["--quiet", "finetune", "--model", str(model_dir), "--sparsity_ratio", "0.5", "--nsamples", "4",
                 "--seqlen", "32", "--calib_dataset", str(corpus), "--rmi_nsamples", "4", "--rank_nsamples", "4",
                 "--steps", "2", "--lora_r", "4", "--r_max", "8", "--rank_start", "2", "--rank_end", "4",
                 "--data", str(corpus), "--ft_nsamples", "6", "--ft_seqlen", "32", "--ft_batch_size", "2",
                 "--step_eval_windows", "0", "--eval", "none", "--out", str(out), *extra]))


def test_cli_finetune_compares_methods_and_saves_plain_sparse_models(tmp_path, saved_model_dir, corpus):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ft"
    assert _cli(saved_model_dir, corpus, out, "--method", "none,masked-lora,losa") == 0
    assert (out / "comparison.md").is_file()
    for m in ("none", "masked-lora", "losa"):
        side = json.loads((out / m / "sparsity_config.json").read_text())
        loaded = AutoModelForCausalLM.from_pretrained(out / m)
        assert side["global_sparsity"] == linear_sparsity(loaded)["sparsity"]
        assert abs(side["global_sparsity"] - 0.5) < 0.02
        assert not (tmp_path / "ft" / f"{m}.ckpt").exists()
    assert (out / "losa" / "adapter" / "adapter_config.json").is_file()
    assert not (out / "none" / "adapter").exists()
    report = json.loads((out / "losa" / "report.json").read_text())
    assert len(report["finetune"]["steps"]) == 2
    before = (out / "comparison.md").read_bytes()
    assert _cli(saved_model_dir, corpus, out, "--method", "none,lora") == 2  # another run's comparison is kept
    assert (out / "comparison.md").read_bytes() == before and not (out / "lora").exists()
    assert _cli(saved_model_dir, corpus, out, "--method", "none,losa", "--resume") == 2  # another method list
    assert (out / "comparison.md").read_bytes() == before


def test_cli_interrupt_then_resume(tmp_path, saved_model_dir, corpus, monkeypatch):
    out = tmp_path / "ft"
    real = _interrupt_second_step(monkeypatch)
    assert _cli(saved_model_dir, corpus, out) == 130
    assert not out.exists() and (tmp_path / "ft.ckpt" / "state.json").is_file()
    monkeypatch.setattr(driver, "train", real)
    assert _cli(saved_model_dir, corpus, out) == 2  # a checkpoint is there: neither lost nor silently reused
    assert _cli(saved_model_dir, corpus, out, "--lr", "1e-3", "--resume") == 2  # other settings
    assert _cli(saved_model_dir, corpus, out, "--resume") == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ft.ckpt").exists()


@pytest.mark.parametrize("extra,match", [
    (["--lora_r", "0"], "LoRA rank"), (["--lora_r", "9"], "LoRA rank"), (["--rank_end", "12"], "rank_end"),
    (["--method", "bogus"], "unknown fine-tuning method"), (["--sparsity_type", "2:4"], "N:M"),
    (["--resume"], "no checkpoint"), (["--ft_nsamples", "1"], "own slice"), (["--steps", "0"], "steps"),
    (["--sparsity_ratio", "1.0"], "sparsity"), (["--method", "lora", "--resume"], "LoSA"),
    (["--eval_seqlen", "0"], "eval_seqlen"), (["--lr", "nan"], "finite"),
])
def test_cli_finetune_bad_input(tmp_path, saved_model_dir, corpus, capsys, extra, match):
    out = tmp_path / "ft"
    assert _cli(saved_model_dir, corpus, out, *extra) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_cli_finetune_instruction_file_without_rows(tmp_path, saved_model_dir, corpus, capsys):
    bad = tmp_path / "inst.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": ""}) + "\n")
    args = ["--data", str(bad)]
    assert _cli(saved_model_dir, corpus, tmp_path / "ft", *args) == 2
    assert "no usable rows" in capsys.readouterr().err


def test_a_run_is_reproducible_whatever_the_global_rng(tokenizer, corpus):
    ex = text_examples(tokenizer, str(corpus), 6, 32, seed=1)
    out = []
    for noise in (1, 2):
        model = make_model("llama")
        torch.manual_seed(noise)  # the caller's RNG state must not matter: --seed decides
        finetune(model, tokenizer, cfg(corpus, steps=2, lora_dropout=0.1), ex, progress=False)
        out.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*out):
        assert torch.equal(p, q)


def test_cli_resume_of_a_finished_run_with_other_settings(tmp_path, saved_model_dir, corpus, capsys):
    out = tmp_path / "ft"
    assert _cli(saved_model_dir, corpus, out, "--method", "none,masked-lora") == 0
    assert _cli(saved_model_dir, corpus, out, "--method", "none,masked-lora,losa", "--resume") == 2  # no LoSA checkpoint
    capsys.readouterr()
    assert _cli(saved_model_dir, corpus, out, "--method", "none,losa", "--lora_r", "2", "--resume") == 2
    assert "finished with other settings (lora_r)" in capsys.readouterr().err


def test_cli_never_deletes_an_input_named_like_the_checkpoint(tmp_path, saved_model_dir, corpus, capsys):
    import shutil

    victim = tmp_path / "victim.ckpt"
    shutil.copytree(saved_model_dir, victim)
    before = sorted(p.name for p in victim.iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(["--quiet", "finetune", "--model", str(victim), "--method", "none", "--nsamples", "4", "--seqlen",
                     "32", "--calib_dataset", str(corpus), "--data", str(corpus), "--ft_nsamples", "2", "--ft_seqlen",
                     "32", "--eval", "none", "--out", str(tmp_path / "victim"), *extra]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert sorted(p.name for p in victim.iterdir()) == before


def test_nm_masked_lora_keeps_the_pattern(tokenizer, corpus):
    ex = text_examples(tokenizer, str(corpus), 4, 32, seed=1)
    model = make_model("llama")
    rep = finetune(model, tokenizer, cfg(corpus, method="masked-lora", sparsity_ratio=None, sparsity_type="2:4"),
                   ex, progress=False)
    assert rep["measured"]["sparsity"] == 0.5
    for block in get_blocks(model):
        for lin in block_linears(model, block).values():
            groups = (lin.weight != 0).reshape(lin.out_features, -1, 4).sum(-1)
            assert bool((groups <= 2).all())
