"""The fine-tuning stage's data and loop on tiny models: response-only labels for instruction data, the
warm-up/decay schedule, and a masked-LoRA fine-tune that lowers the loss and, once merged, keeps every zero."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, sentences
from sparsellm.adapt import add_masked_lora, merge
from sparsellm.adapt.train import PROMPT, instruction_examples, lr_at, text_examples, train
from sparsellm.pipeline import PruneConfig, prune
from sparsellm.errors import UsageError


def test_instruction_labels_cover_only_the_response(tmp_path, tokenizer):
    f = tmp_path / "a.jsonl"
    rows = [{"instruction": "name the city", "input": "", "output": "the river city"},
            {"instruction": "play a song", "input": "the band", "output": "music"},
            *[{"instruction": f"count to {k}", "output": "one two"} for k in range(18)],
            {"instruction": "", "output": "skipped"}, {"instruction": "no output"}]  # 2 of 22 dropped: under 10%
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ex = instruction_examples(tokenizer, f, max_length=512)
    assert len(ex) == 20
    for (ids, labels), r in zip(ex[:2], rows[:2]):
        prompt = PROMPT.format(ctx=", paired with an input that provides further context" if r["input"] else "",
                               instruction=r["instruction"], input=f"### Input:\n{r['input']}\n\n" if r["input"] else "")
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        assert (labels[:n_prompt] == -100).all()
        resp = tokenizer(r["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert labels[n_prompt:].tolist() == resp and ids[n_prompt:].tolist() == resp


@pytest.mark.parametrize("content,match", [("", "no usable rows"), ("{bad", "JSON"),
                                           ('[{"instruction": "x"}]', "no usable rows")])
def test_instruction_bad_input(tmp_path, tokenizer, content, match):
    f = tmp_path / "a.json"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        instruction_examples(tokenizer, f)
    with pytest.raises(UsageError, match="not found"):
        instruction_examples(tokenizer, tmp_path / "nope.json")


def test_lr_schedule():
    assert [lr_at(s, 10, 1.0, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, 10, 1.0, 2) == pytest.approx(1.0) and lr_at(6, 10, 1.0, 2) == pytest.approx(0.5)
    assert lr_at(10, 10, 1.0, 2) == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_lora_finetune_lowers_loss_and_merges_sparse(tmp_path, tokenizer, checkpointing):
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(sentences(200)))
    model = make_model("llama")
    prune(model, tokenizer, PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.6, nsamples=2, seqlen=16,
                                        calib_dataset=str(calib), diag_nsamples=0), progress=False)
    zeros = {n: (p == 0) for n, p in model.named_parameters() if p.dim() == 2}
    add_masked_lora(model, r=4, alpha=8, dropout=0.0)
    ex = text_examples(tokenizer, str(calib), 8, 32, seed=1)
    before = train(model, ex, lr=1e-9, batch_size=4, grad_accum=1, progress=False)["losses"][0]
    torch.manual_seed(0)
    res = train(model, ex, lr=2e-2, batch_size=4, grad_accum=2, epochs=10, warmup_ratio=0.1, max_grad_norm=1.0,
                gradient_checkpointing=checkpointing, progress=False)
    assert res["steps"] == 10 and res["tokens"] == 10 * 8 * 32
    assert res["losses"][-1] < before - 0.05
    merge(model)
    for n, p in model.named_parameters():
        key = n.replace(".base", "")
        if key in zeros:
            assert bool(p[zeros[key]].eq(0).all()), n  # every pruned weight is still exactly zero
