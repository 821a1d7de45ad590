"""`run_finetune` as a library function (what `sparsellm finetune` calls): a FinetuneRun in, a Run record out,
the directories written through RunDir; its validate() refuses a bad value of every sub-config with a
UsageError before anything is written; perplexity windows default to 2048 tokens capped at the context."""

from __future__ import annotations

import json

import pytest

from conftest import sentences
from sparsellm.adapt import FinetuneConfig, LoSAConfig
from sparsellm.config import Evaluation, ModelSource, Output
from sparsellm.errors import UsageError
from sparsellm.runs import FinetuneRun, Run, run_finetune
from sparsellm.runs.finetune import comparison_text, from_dict

FLAT = dict(sparsity_ratio=0.5, nsamples=4, seqlen=32, lora_r=4, lr=2e-2, ft_batch_size=2, grad_accum=1,
            ft_nsamples=4, ft_seqlen=32, step_eval_windows=0)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


def _run(model_dir, corpus, out, methods="none", evaluation=None, **kw) -> FinetuneRun:
    flat = {**FLAT, "calib_dataset": str(corpus), "data": str(corpus), **kw}
    return FinetuneRun(source=ModelSource(str(model_dir)), methods=methods, finetune=FinetuneConfig.from_flat(**flat),
                       method_configs={"losa": LoSAConfig(r_max=8, steps=2, rank_nsamples=2, rank_start=2, rank_end=4)},
                       evaluation=evaluation or Evaluation(eval="none"), output=Output(out=str(out)))


def test_one_method_returns_its_record_as_written(tmp_path, saved_model_dir, corpus):
    out = tmp_path / "ft"
    record = run_finetune(_run(saved_model_dir, corpus, out, evaluation=Evaluation(max_windows=1)), progress=False)
    assert isinstance(record, Run) and record.command == "finetune" and record.config["method"] == "none"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(record.to_dict()))
    assert list(record.metrics) == ["wikitext2_ppl@128"]  # 2048 capped at the tiny model's context (128)
    assert record.details["eval_seqlen"] == 128 and record.calibration["nsamples"] == 4
    assert from_dict(on_disk).to_dict() == on_disk
    assert "| none |" in comparison_text(record) and not (out / "adapter").exists()


def test_several_methods_return_the_comparison(tmp_path, saved_model_dir, corpus):
    out = tmp_path / "ft"
    record = run_finetune(_run(saved_model_dir, corpus, out, "none,masked-lora,losa"), progress=False)
    assert list(record.details["runs"]) == ["none", "masked-lora", "losa"]
    for m, r in record.details["runs"].items():
        assert json.loads((out / m / "report.json").read_text()) == json.loads(json.dumps(r))
        assert (out / m / "adapter").is_dir() == (m != "none")
    assert record.details["runs"]["losa"]["config"]["steps"] == 2  # method_configs reached LoSA
    assert "steps" not in record.details["runs"]["masked-lora"]["config"]
    assert sorted(json.loads((out / "comparison.json").read_text())) == ["losa", "masked-lora", "none"]
    assert comparison_text(record) in (out / "comparison.md").read_text()


@pytest.mark.parametrize("change,match", [
    (lambda r: setattr(r.source, "dtype", "float64"), "--dtype"),
    (lambda r: setattr(r, "methods", "none,bogus"), "unknown fine-tuning method 'bogus'"),
    (lambda r: setattr(r, "methods", "none,none"), "distinct"),
    (lambda r: setattr(r.finetune.prune, "sparsity_ratio", 1.5), "sparsity"),
    (lambda r: setattr(r.finetune.calibration, "nsamples", 0), "--nsamples"),
    (lambda r: setattr(r.finetune.lora, "lora_r", 0), "LoRA rank"),
    (lambda r: setattr(r.finetune.training, "data", "/no/such/file.txt"), "data file not found"),
    (lambda r: setattr(r, "method_configs", {"none": LoSAConfig()}), "not the config"),
    (lambda r: r.method_configs["losa"].__setattr__("steps", 0), "--steps"),
    (lambda r: setattr(r.evaluation, "eval", "bogus"), "unknown evaluation"),
    (lambda r: setattr(r.evaluation, "eval_seqlen", 1), "--eval_seqlen"),
    (lambda r: setattr(r.output, "out", None), "give --out"),
    (lambda r: (setattr(r, "methods", "none,masked-lora"), setattr(r, "resume", True)), "LoSA"),
    (lambda r: (setattr(r, "methods", "losa"), setattr(r, "resume", True)), "no checkpoint"),
    (lambda r: (setattr(r, "methods", "losa"), setattr(r, "resume", True), setattr(r.output, "overwrite", True)),
     "contradict"),
])
def test_validate_refuses_every_bad_sub_config(tmp_path, saved_model_dir, corpus, change, match):
    cfg = _run(saved_model_dir, corpus, tmp_path / "ft", "none,losa")
    change(cfg)
    with pytest.raises(UsageError, match=match) as e:
        run_finetune(cfg, progress=False)
    assert type(e.value) is UsageError
    assert not (tmp_path / "ft").exists()


def test_a_structured_model_is_refused(tmp_path, saved_model_dir, corpus):
    (saved_model_dir / "structure.json").write_text("{}")
    with pytest.raises(UsageError, match="structured model"):
        _run(saved_model_dir, corpus, tmp_path / "ft").validate()
