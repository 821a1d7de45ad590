"""Items 10 and 16 of issue 20: a perplexity result names its dataset, split, source file (SHA-256) and the
hash of the scored tokens; a zero-shot result names dtype, device, lm-eval version and the task files'
hashes, gives each accuracy with its standard error, and warns when --limit leaves it above 5 points."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import logging
import math
import statistics
from pathlib import Path

import pytest
import torch

import sparsellm
from conftest import make_model, require

ppl_mod = importlib.import_module("sparsellm.evaluate.perplexity")
PKG_DATA = Path(sparsellm.__file__).parent / "data"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("dataset,split,name", [("wikitext2", "test", "wikitext2_test.raw.gz"),
                                                ("c4", "validation", "c4_validation.jsonl.gz")])
def test_perplexity_names_dataset_split_source_and_token_hash(monkeypatch, tokenizer, dataset, split, name):
    ids = torch.randint(0, 128, (1, 5 * 16 + 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ppl_mod, "eval_tokens", lambda tok, ds, seqlen: ids)
    r = ppl_mod.perplexity(make_model("llama"), tokenizer, dataset, seqlen=16, max_windows=3, progress=False)
    assert (r["dataset"], r["split"], r["seqlen"], r["windows"]) == (dataset, split, 16, 3)
    assert r["source"] == f"sparsellm/data/{name}" and r["source_sha256"] == _sha(PKG_DATA / name)
    scored = [int(t) for t in ids[0, : 3 * 16]]
    assert r["tokens_sha256"] == hashlib.sha256(b"".join(t.to_bytes(8, "little", signed=True) for t in scored)).hexdigest()


def test_eval_ppl_record_carries_the_provenance(tmp_path, saved_model_dir, capsys):
    from sparsellm.cli import main

    assert main(["--quiet", "eval", "ppl", "--model", str(saved_model_dir), "--max_windows", "1", "--seqlen", "32",
                 "--save", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "rep" / "report.json").read_text())["eval"]["wikitext2_ppl@32"]
    assert r["split"] == "test" and r["source_sha256"] == _sha(PKG_DATA / "wikitext2_test.raw.gz")
    assert "test split" in out and r["source_sha256"][:12] in out


# ------------------------------------------------------------------ zero-shot

def _zs():
    require("lm_eval")
    from sparsellm.evaluate import zeroshot as zs_mod

    return zs_mod


def _rte_gold():
    with gzip.open(PKG_DATA / "zeroshot" / "rte" / "val.jsonl.gz", "rt", encoding="utf-8") as f:
        return [("True" if json.loads(line)["label"] == "entailment" else "False") for line in f if line.strip()]


def _oracle(right):
    """An lm-eval LM that answers RTE document i correctly iff right(i)."""
    from lm_eval.api.model import LM

    gold = _rte_gold()

    class Oracle(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            out = []
            for req in requests:
                cont = req.args[1].strip()
                want = gold[req.doc_id] if right(req.doc_id) else ("False" if gold[req.doc_id] == "True" else "True")
                out.append((0.0 if cont == want else -10.0, cont == want))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


@pytest.mark.zeroshot
def test_accuracy_has_its_standard_error_and_a_wide_one_is_warned(caplog):
    zs = _zs()
    right = lambda i: i % 3 != 0  # noqa: E731  (documents 0, 3, 6, ... answered wrongly)
    with caplog.at_level(logging.WARNING, logger="sparsellm"):
        res = zs.zeroshot(None, None, ["rte"], limit=30, lm=_oracle(right))
    scores = [1.0 if right(i) else 0.0 for i in range(30)]
    r = res["tasks"]["rte"]
    assert r["acc"] == pytest.approx(statistics.mean(scores))
    se = statistics.stdev(scores) / math.sqrt(30)  # the sample standard deviation over sqrt(n)
    assert r["acc_stderr"] == pytest.approx(se) and se > 0.05
    assert res["mean_acc_stderr"] == pytest.approx(se)
    assert len(res["warnings"]) == 1 and "--limit 30" in res["warnings"][0] and "rte" in res["warnings"][0]
    assert any("--limit 30" in rec.getMessage() for rec in caplog.records)
    # all of RTE (no --limit): no warning, even though the task is small
    assert zs.zeroshot(None, None, ["rte"], limit=None, lm=_oracle(right))["warnings"] == []


@pytest.mark.zeroshot
def test_zeroshot_names_dtype_device_version_and_task_files(tokenizer):
    zs = _zs()
    import lm_eval

    model = make_model("llama", max_position_embeddings=512).to(torch.bfloat16)
    res = zs.zeroshot(model, tokenizer, ["rte", "piqa"], limit=2, batch_size=2)
    s = res["settings"]
    assert (s["dtype"], s["device"]) == ("bfloat16", "cpu")
    assert s["lm_eval"] == importlib.metadata.version("lm_eval")
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    assert s["task_files"]["rte"] == {"data": "sparsellm/data/zeroshot/rte/val.jsonl.gz",
                                      "data_sha256": _sha(PKG_DATA / "zeroshot/rte/val.jsonl.gz"),
                                      "yaml": "glue/rte/default.yaml",
                                      "yaml_sha256": _sha(tasks_dir / "glue/rte/default.yaml")}
    assert s["task_files"]["piqa"]["data_sha256"] == _sha(PKG_DATA / "zeroshot/piqa/valid.jsonl.gz")
