"""Fine-tuning an already-pruned model (issue 20, items 3, 7 and 10): the input's masks and per-block rates are
kept (recognised from its sidecar, else from its weights), another target is refused before anything is
written, the merge's logit difference against the adapted model is recorded and printed, and the record
holds the SHA-256 of the calibration tokens and of the fine-tuning examples."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import drop_unchosen, make_model, sentences
from sparsellm.adapt import FinetuneConfig, add_masked_lora, lora_layers, merge
from sparsellm.adapt.driver import Job, finetune
from sparsellm.adapt.pruned_input import pruned_input
from sparsellm.adapt.train import finetune_examples, text_examples
from sparsellm.cli import main
from sparsellm.data import calibration_windows
from sparsellm.pipeline import PruneConfig, prune
from test_cli import _assert_one_line_error, _tree

BETA, S = 0.2, 0.5
ATP_RATES = [S - BETA * (2 - 1) / 2 + BETA * i for i in range(2)]  # ATP's progression on the 2-block llama
SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval", "none"]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


def _ft(model_dir, corpus, out, *extra) -> int:
    return main(drop_unchosen(["--quiet", "finetune", "--model", str(model_dir), *SMALL, "--calib_dataset", str(corpus),
                 "--rmi_nsamples", "4", "--rank_nsamples", "4", "--steps", "2", "--lora_r", "4", "--r_max", "8",
                 "--rank_start", "2", "--rank_end", "4", "--data", str(corpus), "--ft_nsamples", "4",
                 "--ft_seqlen", "32", "--ft_batch_size", "2", "--step_eval_windows", "0", "--out", str(out), *extra]))


def _atp_model(tmp_path, model_dir, corpus):
    """The tiny llama pruned by `sparsellm prune` with ATP (rates 0.4, 0.6): a directory with its sidecar."""
    out = tmp_path / "atp"
    assert main(["--quiet", "prune", "--model", str(model_dir), *SMALL, "--calib_dataset", str(corpus),
                 "--prune_method", "wanda", "--allocation", "atp", "--atp_beta", str(BETA), "--sparsity_ratio",
                 str(S), "--out", str(out)]) == 0
    return out


def _zeros(model_dir) -> dict:
    """The zero set of every block linear in a saved model."""
    w = load_file(str(model_dir / "model.safetensors"))
    return {n: t == 0 for n, t in w.items() if ".layers." in n and n.endswith("proj.weight")}


def _block_sparsity(zeros: dict) -> list[float]:
    out = []
    for i in range(2):
        ms = [z for n, z in zeros.items() if f".layers.{i}." in n]
        out.append(sum(int(z.sum()) for z in ms) / sum(z.numel() for z in ms))
    return out


def test_a_pruned_input_keeps_its_masks_and_rates(tmp_path, saved_model_dir, corpus):
    src = _atp_model(tmp_path, saved_model_dir, corpus)
    zeros_in = _zeros(src)
    assert _block_sparsity(zeros_in)[0] < S - 0.05  # truly non-uniform, and below S on the whole
    out = tmp_path / "ft"
    assert _ft(src, corpus, out, "--method", "none,masked-lora,losa") == 0  # --sparsity_ratio left out
    for m in ("none", "masked-lora", "losa"):
        zeros_out = _zeros(out / m)
        for n, z in zeros_in.items():
            assert torch.equal(zeros_out[n], z), (m, n)  # the very same masks, never re-pruned
        rec = json.loads((out / m / "report.json").read_text())
        sc = json.loads((out / m / "sparsity_config.json").read_text())
        assert sc["allocation"]["name"] == "atp" and sc["allocation"]["rates"] == pytest.approx(ATP_RATES)
        assert [b["target"] for b in rec["blocks"]] == pytest.approx(ATP_RATES)
        inp = rec["finetune"]["input"]
        assert inp["kept"] and inp["source"] == "sidecar" and inp["target"] == S and inp["method"] == "wanda"
        assert rec["config"]["sparsity_ratio"] == S
    losa = json.loads((out / "losa" / "report.json").read_text())["finetune"]
    assert [st["target"] for st in losa["steps"]] == [S, S]  # no ramp
    assert all(len(set(st["ranks"])) == 1 for st in losa["steps"]) and losa["steps"][-1]["ranks"] == [4, 4]
    none = load_file(str(out / "none" / "model.safetensors"))
    for n, t in load_file(str(src / "model.safetensors")).items():
        assert torch.equal(none[n], t), n


def test_another_target_is_refused_before_anything_is_written(tmp_path, saved_model_dir, corpus, capsys):
    src = _atp_model(tmp_path, saved_model_dir, corpus)
    for extra, says in ((["--sparsity_ratio", "0.6"], "--sparsity_ratio 0.6 differs"),
                        (["--sparsity_type", "2:4"], "--sparsity_type 2:4 differs")):
        before = _tree(tmp_path)
        capsys.readouterr()
        code = _ft(src, corpus, tmp_path / "ft", "--method", "masked-lora", *extra)
        err = capsys.readouterr().err
        _assert_one_line_error(code, err)
        assert code == 2 and says in err and "already pruned" in err
        assert _tree(tmp_path) == before


def test_without_a_sidecar_the_measured_per_block_sparsity_is_kept(tmp_path, tokenizer, corpus, capsys):
    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=S, allocation="atp",
                                                  atp_beta=BETA, nsamples=4, seqlen=32, calib_dataset=str(corpus),
                                                  diag_nsamples=0), progress=False)
    src = tmp_path / "elsewhere"  # pruned by another tool: no sidecar
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    zeros_in = _zeros(src)
    measured = _block_sparsity(zeros_in)
    overall = sum(int(z.sum()) for z in zeros_in.values()) / sum(z.numel() for z in zeros_in.values())
    before = _tree(tmp_path)
    capsys.readouterr()
    code = _ft(src, corpus, tmp_path / "ft", "--method", "none", "--sparsity_ratio", "0.7")
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert code == 2 and "already pruned" in err and _tree(tmp_path) == before
    assert _ft(src, corpus, tmp_path / "ft", "--method", "masked-lora") == 0
    rec = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rec["finetune"]["input"]["source"] == "measured"
    assert rec["config"]["sparsity_ratio"] == pytest.approx(overall)
    assert [b["target"] for b in rec["blocks"]] == pytest.approx(measured)
    for n, z in _zeros(tmp_path / "ft").items():
        assert torch.equal(z, zeros_in[n]), n


def test_a_sidecar_that_does_not_match_the_weights_is_not_trusted(tokenizer, corpus):
    dense = make_model("llama")
    claim = {"global_sparsity": 0.5, "target_sparsity": 0.5, "sparsity_structure": "unstructured", "method": "wanda",
             "allocation": {"name": "uniform", "rates": [0.5, 0.5]}}
    assert pruned_input(dense, claim) is None  # e.g. plain LoRA's output: dense again, whatever the sidecar says
    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="magnitude", sparsity_ratio=0.3, nsamples=1,
                                                  seqlen=16, calib_dataset=str(corpus)), progress=False)
    inp = pruned_input(model, claim)
    assert inp.source == "measured" and abs(inp.target - 0.3) < 0.02


def test_the_library_keeps_an_in_memory_pruned_model(tokenizer, corpus):
    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, nsamples=4, seqlen=32,
                                                  calib_dataset=str(corpus), diag_nsamples=0), progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = FinetuneConfig.from_flat(method="none", nsamples=4, seqlen=32, calib_dataset=str(corpus),
                                   step_eval_windows=0)
    ex = text_examples(tokenizer, str(corpus), 2, 32, seed=1)
    rep = finetune(model, tokenizer, cfg, ex, progress=False)
    assert abs(cfg.sparsity_ratio - 0.6) < 0.01  # the input's, not the default 0.5 (per-row floors: 0.59375)
    assert rep["prune"] is None and rep["input"]["kept"] and cfg.sparsity_ratio == rep["input"]["target"]
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)


def test_merge_records_the_logit_difference_against_the_adapted_model(tokenizer):
    model = make_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p[p.abs() < 0.01] = 0
    add_masked_lora(model, r=4, alpha=8, dropout=0.1)
    torch.manual_seed(0)
    for m in lora_layers(model):
        m.lora_B.data.normal_(0, 0.05)
    ids = torch.randint(3, 100, (2, 24))
    model.eval()
    with torch.no_grad():
        adapted = model(ids[:1]).logits.float()
    job = Job(model, tokenizer, FinetuneConfig(), [], ids, 0, 16)
    model.train()  # the check runs in eval mode (no dropout) and restores the mode
    got = job.merge_checked(lambda: merge(model))
    with torch.no_grad():
        merged = model(ids[:1]).logits.float()
    assert model.training and all(m.merged for m in lora_layers(model))
    assert got == {"max_abs_logit_diff": float((merged - adapted).abs().max()), "tokens": 24, "dtype": "bfloat16"}
    assert got["max_abs_logit_diff"] > 0  # bf16: the merged weights are rounded


def test_the_record_has_the_merge_difference_and_the_token_hashes(tmp_path, saved_model_dir, tokenizer, corpus,
                                                                   capsys):
    out = tmp_path / "ft"
    capsys.readouterr()
    assert _ft(saved_model_dir, corpus, out, "--method", "none,masked-lora", "--sparsity_ratio", "0.5", "--dtype",
               "bfloat16", "--seed", "3") == 0
    table = capsys.readouterr().out
    calib = calibration_windows(tokenizer, str(corpus), 4, 32, 3)
    examples = finetune_examples(tokenizer, str(corpus), 4, 32, 4)
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(ids.numpy().tobytes())
        h.update(labels.numpy().tobytes())
    for m in ("none", "masked-lora"):
        rec = json.loads((out / m / "report.json").read_text())
        assert rec["calibration"]["tokens_sha256"] == hashlib.sha256(calib.numpy().tobytes()).hexdigest()
        assert rec["data"]["tokens_sha256"] == h.hexdigest()
        sc = json.loads((out / m / "sparsity_config.json").read_text())
        assert sc["calibration"]["tokens_sha256"] == rec["calibration"]["tokens_sha256"]
    assert json.loads((out / "none" / "report.json").read_text())["finetune"]["merge"] is None
    merge_info = json.loads((out / "masked-lora" / "report.json").read_text())["finetune"]["merge"]
    assert merge_info["dtype"] == "bfloat16" and merge_info["tokens"] == 32 and merge_info["max_abs_logit_diff"] >= 0
    assert "merge max |Δlogit|" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| masked-lora |"))
    assert f"| {merge_info['max_abs_logit_diff']:.3g} |" in row
