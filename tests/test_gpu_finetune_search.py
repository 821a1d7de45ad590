"""Fine-tuning and Self-Pruner search on the resolved device (`--device`, `--dtype`; issue item 5).

On the CPU: `--device cpu` and `--device auto` give exactly the numbers of a run with the defaults; the record
holds the resolved names ("float32", "cpu"), never "auto"; `--device cuda` without CUDA is a one-line error,
exit 2, nothing written; the adapters are float32 master weights whatever the model's dtype; a merge under
autocast is still a float32 sum cast once; a model that does not fit is onloaded (or refused for training).
With CUDA: masked LoRA trained in bf16 / fp16 on the GPU keeps the exact zero set through the merge, and a
search fitness on the GPU (model whole or onloaded) equals the CPU one within bf16 tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import drop_unchosen, make_model, sentences
from sparsellm.cli import main
from sparsellm.errors import UsageError
from test_cli_bad_input import _argv, _check

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


def _finetune(model_dir, corpus, out, *extra) -> int:
    return main(drop_unchosen(["--quiet", "finetune", "--model", str(model_dir), "--method", "masked-lora",
                               "--sparsity_ratio", "0.5", "--nsamples", "4", "--seqlen", "32", "--calib_dataset",
                               str(corpus), "--lora_r", "4", "--r_max", "8", "--lr", "2e-2", "--data", str(corpus),
                               "--ft_nsamples", "4", "--ft_seqlen", "32", "--ft_batch_size", "2", "--grad_accum", "1",
                               "--step_eval_windows", "1", "--eval", "wikitext2", "--eval_seqlen", "32",
                               "--max_windows", "2", "--out", str(out), *extra]))


def _search(model_dir, out, *extra) -> int:
    return main(["--quiet", "search", "--model", str(model_dir), "--target_rate", "0.3", "--max_rate", "0.6",
                 "--population", "4", "--generations", "1", "--crossover", "2", "--mutation", "2", "--nsamples", "2",
                 "--seqlen", "32", "--fitness_windows", "2", "--fitness_seqlen", "32", "--final_k", "1", "--eval",
                 "wikitext2", "--eval_seqlen", "32", "--max_windows", "1", "--backend", "ga", "--out", str(out), *extra])


def _numbers(out, command: str) -> dict:
    """What a run computed (no timings, no memory): metrics, losses, merge, fitness, and the weights' bytes."""
    rep = json.loads((out / "report.json").read_text())
    weights = (out / "model.safetensors").read_bytes()
    if command == "finetune":
        ft = rep["finetune"]
        return {"eval": rep["eval"], "losses": ft["train"]["losses"], "merge": ft["merge"]["max_abs_logit_diff"],
                "step_ppl": [s["ppl"] for s in ft["steps"]], "measured": ft["measured"], "weights": weights}
    s = rep["search"]
    return {"eval": rep["eval"], "best": s["best_rates"], "fitness": s["best_fitness"],
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in s["history"]], "weights": weights}


# ------------------------------------------------------------------------------------------------ on the CPU


def test_cli_finetune_device_cpu_and_auto_give_the_defaults_numbers(tmp_path, saved_model_dir, corpus):
    runs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto", "--dtype", "auto"])):
        if name != "cpu" and CUDA:
            continue  # the default (auto) is the GPU there  # auto is the GPU there
        assert _finetune(saved_model_dir, corpus, tmp_path / name, *extra) == 0
        runs[name] = _numbers(tmp_path / name, "finetune")
        rep = json.loads((tmp_path / name / "report.json").read_text())
        assert (rep["compute_dtype"], rep["device"], rep["placement"]) == ("float32", "cpu", "cpu")
        assert rep["finetune"]["merge"]["dtype"] == "float32"
    assert all(r == runs["cpu"] for r in runs.values())
    assert len(runs["cpu"]["losses"]) == 2


def test_cli_search_device_cpu_and_auto_give_the_defaults_numbers(tmp_path, saved_model_dir):
    runs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto", "--dtype", "auto"])):
        if name != "cpu" and CUDA:
            continue  # the default (auto) is the GPU there
        assert _search(saved_model_dir, tmp_path / name, *extra) == 0
        runs[name] = _numbers(tmp_path / name, "search")
        rep = json.loads((tmp_path / name / "report.json").read_text())
        assert (rep["config"]["dtype"], rep["config"]["device"]) == ("float32", "cpu")  # resolved, not "auto"
        assert (rep["compute_dtype"], rep["device"], rep["placement"]) == ("float32", "cpu", "cpu")
    assert all(r == runs["cpu"] for r in runs.values())


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("sub", ["finetune", "search"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cli_device_cuda_without_cuda_is_one_line_and_writes_nothing(capsys, tmp_path, saved_model_dir, calib_txt,
                                                                      sub, device):
    argv = drop_unchosen(_argv(sub, str(saved_model_dir), str(calib_txt), str(tmp_path / "out")))
    err = _check(capsys, tmp_path, argv + ["--device", device])
    assert f"--device {device}" in err and "no CUDA device" in err and "--device cpu" in err


@pytest.mark.skipif(CUDA, reason="--dtype auto is bfloat16 on the GPU here")
def test_finetune_resume_compares_the_resolved_dtype(tmp_path, saved_model_dir, corpus):
    """A finished method's record holds the resolved dtype; --resume accepts it for --dtype auto on the CPU
    (float32), refuses another one, and still accepts a record written as "auto" before dtypes were resolved."""
    from sparsellm.adapt import FinetuneConfig
    from sparsellm.config import Evaluation, ModelSource, Output
    from sparsellm.runs import FinetuneRun, run_finetune

    flat = dict(sparsity_ratio=0.5, nsamples=4, seqlen=32, calib_dataset=str(corpus), data=str(corpus), ft_nsamples=4,
                ft_seqlen=32, step_eval_windows=0)

    def cfg(methods, out, resume=False):
        return FinetuneRun(source=ModelSource(str(saved_model_dir)), methods=methods,
                           finetune=FinetuneConfig.from_flat(**flat), evaluation=Evaluation(eval="none"),
                           output=Output(out=str(out)), resume=resume)

    root = tmp_path / "ft"
    run_finetune(cfg("none", root / "none"), progress=False)  # what "none,losa" writes into OUT/none
    report = root / "none" / "report.json"
    assert json.loads(report.read_text())["compute_dtype"] == "float32"
    with pytest.raises(UsageError, match="no checkpoint"):  # none is accepted as finished; losa has nothing
        cfg("none,losa", root, resume=True).plan()
    for old, refused in (("bfloat16", True), ("auto", False)):
        rec = json.loads(report.read_text())
        rec["compute_dtype"] = old
        report.write_text(json.dumps(rec))
        with pytest.raises(UsageError, match="--dtype" if refused else "no checkpoint"):
            cfg("none,losa", root, resume=True).plan()


def test_adapters_are_float32_master_weights_on_a_bf16_model(tokenizer):
    from sparsellm.adapt import add_masked_lora
    from sparsellm.adapt.train import text_examples, train

    model = make_model("llama").to(torch.bfloat16)
    layers = add_masked_lora(model, 4, 8.0, 0.0)
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in layers)
    assert all(m.base.weight.dtype == torch.bfloat16 for m in layers)
    examples = text_examples(tokenizer, "c4", 4, 16, 0)
    out = train(model, examples, lr=1e-2, batch_size=2, grad_accum=1, pad_id=0, progress=False,
                autocast_dtype=torch.bfloat16)  # no autocast on the CPU: the bf16 forward with fp32 adapters
    assert out["steps"] == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
    assert any(m.lora_B.abs().sum() > 0 for m in layers) and all(m.lora_A.dtype == torch.float32 for m in layers)


def test_merge_under_autocast_is_still_a_float32_sum_cast_once():
    from sparsellm.adapt import add_masked_lora, merge

    torch.manual_seed(0)
    ref = make_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_((torch.rand_like(p, dtype=torch.float32) > 0.5).to(p.dtype))  # a 50% zero set
    models = []
    for autocast in (False, True):
        model = make_model("llama").to(torch.bfloat16)
        model.load_state_dict(ref.state_dict())
        torch.manual_seed(1)
        layers = add_masked_lora(model, 4, 8.0, 0.0)
        with torch.no_grad():
            for m in layers:
                m.lora_B.normal_(0, 0.05)
        zeros = [m.base.weight == 0 for m in layers]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            merge(model)
        for m, z in zip(layers, zeros):
            assert torch.equal(m.base.weight == 0, z)  # the zero set, exactly
        models.append([m.base.weight.clone() for m in layers])
    assert all(torch.equal(a, b) for a, b in zip(*models))  # autocast did not turn the fp32 product into bf16


def test_placement_moves_whole_attaches_or_refuses(monkeypatch):
    from sparsellm import devices
    from sparsellm.onload import ATTR
    from sparsellm.runs.placement import model_bytes, place

    model = make_model("llama")
    assert place(model, torch.device("cpu")) == "cpu" and not hasattr(model, ATTR)
    nbytes = model_bytes(model)
    assert nbytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    monkeypatch.setattr(devices, "free_bytes", lambda device: int(1.5 * nbytes))  # fits once, not twice
    cuda = torch.device("cuda", 0)
    with pytest.raises(UsageError, match="needs the whole model on cuda:0"):
        place(model, cuda, copies=2, need_whole=True, what="fine-tuning (losa)")
    assert not hasattr(model, ATTR)
    assert place(model, cuda, copies=2) == "onload"
    on = getattr(model, ATTR)
    assert on.device == cuda and on.moves and next(model.parameters()).device.type == "cpu"


def _tiny_losses_and_zero_sets(tokenizer, device, dtype, gradient_checkpointing=False):
    """A tiny llama pruned at 50% on `device` in `dtype`, then masked LoRA (2 optimiser steps) through the
    driver (the input's masks are kept); returns (zero sets before, after the merge, the report)."""
    from sparsellm.adapt import FinetuneConfig
    from sparsellm.adapt.driver import finetune
    from sparsellm.adapt.train import text_examples
    from sparsellm.data import calibration_windows
    from sparsellm.models import block_linears, get_blocks
    from sparsellm.pipeline import PruneConfig, prune

    torch.manual_seed(0)
    model = make_model("llama").to(device=device, dtype=dtype)
    calib = calibration_windows(tokenizer, "c4", 4, 32, 0)
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, nsamples=4, seqlen=32),
          calib_ids=calib, progress=False)

    def zeros():
        return {f"{i}.{n}": (lin.weight == 0).cpu() for i, b in enumerate(get_blocks(model))
                for n, lin in block_linears(model, b).items()}

    before = {n: w.clone() for n, w in zeros().items()}
    weights = [p.detach().clone() for p in model.parameters()]
    cfg = FinetuneConfig.from_flat(method="masked-lora", nsamples=4, seqlen=32, lora_r=4, lr=2e-2, ft_batch_size=2,
                                   grad_accum=1, ft_nsamples=4, ft_seqlen=32, step_eval_windows=0,
                                   gradient_checkpointing=gradient_checkpointing)
    rep = finetune(model, tokenizer, cfg, text_examples(tokenizer, "c4", 4, 32, 1), progress=False)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(weights, model.parameters()))  # it trained
    assert next(model.parameters()).device.type == torch.device(device).type
    return before, zeros(), rep


def test_masked_lora_in_bf16_keeps_the_exact_zero_set_on_the_cpu(tokenizer):
    before, after, rep = _tiny_losses_and_zero_sets(tokenizer, "cpu", torch.bfloat16)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert rep["input"]["pruned"] and len(rep["train"]["losses"]) == 2 and rep["merge"]["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------------ on a GPU


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_lora_on_cuda_keeps_the_exact_zero_set(tokenizer, dtype):
    before, after, rep = _tiny_losses_and_zero_sets(tokenizer, "cuda", dtype, gradient_checkpointing=True)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert len(rep["train"]["losses"]) == 2 and all(torch.isfinite(torch.tensor(rep["train"]["losses"])))
    assert rep["merge"]["dtype"] == str(dtype).removeprefix("torch.")


@needs_cuda
def test_cli_finetune_on_cuda_in_bf16_records_the_device_and_keeps_zeros(tmp_path, saved_model_dir, corpus):
    from safetensors.torch import load_file

    assert _finetune(saved_model_dir, corpus, tmp_path / "none", "--method", "none", "--device", "cuda",
                     "--dtype", "bfloat16") == 0
    assert _finetune(saved_model_dir, corpus, tmp_path / "ml", "--device", "cuda", "--dtype", "bfloat16",
                     "--gradient_checkpointing") == 0
    rep = json.loads((tmp_path / "ml" / "report.json").read_text())
    assert rep["compute_dtype"] == "bfloat16" and rep["device"].startswith("cuda:") and rep["placement"] == "whole"
    assert len(rep["finetune"]["train"]["losses"]) == 2
    pruned, merged = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("none", "ml"))
    for n, w in merged.items():
        if ".layers." in n and n.endswith("proj.weight"):
            assert torch.equal(w == 0, pruned[n] == 0), n  # the same prune on the same device: the same zeros


def _fitness(tokenizer, device, dtype, whole: bool) -> float:
    from sparsellm.data import calibration_windows
    from sparsellm.runs.placement import place
    from sparsellm.selfpruner import SearchConfig
    from sparsellm.selfpruner.driver import Fitness, self_prune

    model = make_model("llama").to(dtype)
    if torch.device(device).type != "cpu":
        if whole:
            assert place(model, device) == "whole"
        else:
            from sparsellm.onload import attach

            attach(model, device)  # stays on the CPU: the importance pass onloads its blocks
    calib = calibration_windows(tokenizer, "c4", 2, 32, 0)
    pruned, rep = self_prune(model, tokenizer, SearchConfig(target_rate=0.3), None, calib,
                             fitness=Fitness(fitness_windows=2, fitness_seqlen=32, final_k=1), progress=False,
                             device=torch.device(device))
    assert next(pruned.parameters()).device.type == torch.device(device).type
    return rep["best_fitness"]


@needs_cuda
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "onloaded"])
def test_search_fitness_on_cuda_matches_the_cpu(tokenizer, whole):
    cpu = _fitness(tokenizer, "cpu", torch.float32, True)
    gpu = _fitness(tokenizer, "cuda", torch.bfloat16, whole)
    assert gpu == pytest.approx(cpu, rel=3e-2)
