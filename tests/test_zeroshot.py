"""Zero-shot evaluation through lm-evaluation-harness on the bundled task files, offline: every task loads
with the right number of well-formed documents; an oracle that knows the answers from the raw files
(read here independently of the field mappings) scores 1.0; a tiny model runs every task; bad input."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from conftest import make_model, require

pytestmark = pytest.mark.zeroshot
require("lm_eval")  # a skip outside CI, an error under CI

from sparsellm.errors import UsageError  # noqa: E402
from sparsellm.evaluate.zeroshot import DATA, PAPER_TASKS, check_tasks, task_config, zeroshot  # noqa: E402

COUNTS = {"boolq": 3270, "rte": 277, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
          "openbookqa": 500, "piqa": 1838}


def _rows(rel):
    with gzip.open(DATA / rel, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _gold(task):
    """The gold answer of every raw document, as (kind, text): 'cont' = the gold continuation (after the
    " " delimiter), 'ctx' = WinoGrande's gold context prefix. Read from the raw files only."""
    if task == "boolq":
        return [("cont", "yes" if r["label"] in (True, "true") else "no") for r in _rows("boolq/val.jsonl.gz")]
    if task == "rte":
        return [("cont", "True" if r["label"] == "entailment" else "False") for r in _rows("rte/val.jsonl.gz")]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        rel = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl.gz", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl.gz",
               "openbookqa": "openbookqa/test.jsonl.gz"}[task]
        return [("cont", next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"].strip()))
                for r in _rows(rel)]
    if task == "piqa":
        labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
        return [("cont", r["sol1"] if lab == "0" else r["sol2"]) for r, lab in zip(_rows("piqa/valid.jsonl.gz"), labels)]
    if task == "winogrande":
        out = []
        for r in _rows("winogrande/dev.jsonl.gz"):
            s = r["sentence"]
            out.append(("ctx", s[:s.index("_")] + r["option" + r["answer"]]))
        return out
    raise KeyError(task)


def _oracle(gold):
    from lm_eval.api.model import LM

    class Oracle(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            out = []
            for req in requests:
                ctx, cont = req.args
                kind, text = gold[req.task_name][req.doc_id]
                hit = cont.strip() == text.strip() if kind == "cont" else ctx.strip() == text.strip()
                out.append((0.0 if hit else -10.0, hit))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_bundled_task_loads_with_all_documents(task):
    from lm_eval.tasks import TaskManager, get_task_dict

    t = get_task_dict([task_config(task)], TaskManager(include_defaults=False))[task]
    docs = list(t.eval_docs)
    assert len(docs) == COUNTS[task] == len(_gold(task))
    for doc in docs[:200]:
        choices = t.doc_to_choice(doc)
        target = t.doc_to_target(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        assert isinstance(target, int) and 0 <= target < len(choices) or task == "winogrande"


def test_oracle_with_the_raw_answer_key_scores_one():
    """The oracle scores the raw file's gold answer highest: accuracy 1.0 on every task proves the field
    mappings (BoolQ's string labels, RTE's label order, PIQA's separate labels, ARC/OBQA keys, ...)."""
    gold = {t: _gold(t) for t in PAPER_TASKS}
    res = zeroshot(None, None, PAPER_TASKS, limit=60, lm=_oracle(gold))
    for t in PAPER_TASKS:
        assert res["tasks"][t]["acc"] == 1.0, t
        assert res["tasks"][t]["n"] == 60
        assert res["tasks"][t]["acc_norm"] in (None, 1.0)
    assert res["mean_acc"] == 1.0 and res["settings"]["lm_eval"].startswith("0.4")
    # and the same oracle on a deliberately wrong key scores 0 (the test can fail)
    flipped = {"rte": [("cont", "False" if g[1] == "True" else "True") for g in gold["rte"]]}
    assert zeroshot(None, None, ["rte"], limit=30, lm=_oracle(flipped))["tasks"]["rte"]["acc"] == 0.0


def test_hellaswag_from_a_user_file(tmp_path):
    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cuts onion {i}.", "ctx_b": "then he",
             "ctx": "", "split": "val", "split_type": "indomain", "label": i % 4, "source_id": "x",
             "endings": [f"ending {i} {k} [title] x" for k in range(4)]} for i in range(5)]
    f = tmp_path / "hellaswag_val.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gold = {"hellaswag": [("cont", f"ending {i} {i % 4}. x") for i in range(5)]}  # lm-eval's preprocess
    res = zeroshot(None, None, ["hellaswag"], lm=_oracle(gold), hellaswag_file=str(f))
    assert res["tasks"]["hellaswag"]["acc"] == 1.0 and res["tasks"]["hellaswag"]["n"] == 5


def test_tiny_model_runs_every_task(tokenizer):
    model = make_model("llama", max_position_embeddings=512)
    res = zeroshot(model, tokenizer, PAPER_TASKS, limit=2, batch_size=2)
    assert set(res["tasks"]) == set(PAPER_TASKS)
    for t, r in res["tasks"].items():
        assert r["n"] == 2 and math.isfinite(r["acc"]) and 0.0 <= r["acc"] <= 1.0, t
    assert res["mean_acc"] == pytest.approx(sum(r["acc"] for r in res["tasks"].values()) / len(PAPER_TASKS))


@pytest.mark.parametrize("tasks,kw,match", [
    (["boolq", "nope"], {}, "unknown zero-shot task"),
    ([], {}, "no zero-shot tasks"),
    (["hellaswag"], {}, "not bundled"),
    (["hellaswag"], {"hellaswag_file": "/nonexistent/h.jsonl"}, "not found"),
    (["boolq"], {"limit": 0}, "--limit"),
    (["boolq"], {"limit": -3}, "--limit"),
])
def test_bad_input(tasks, kw, match):
    with pytest.raises(UsageError, match=match):
        check_tasks(tasks, **kw)


def test_cli_eval_zeroshot(capsys, tmp_path, saved_model_dir):
    from sparsellm.cli import main

    assert main(["--quiet", "eval", "zeroshot", "--model", str(saved_model_dir), "--tasks", "rte,piqa",
                 "--limit", "2", "--batch_size", "2", "--save", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| rte | 2 |" in out and "mean acc" in out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(rep["eval"]["zeroshot"]["tasks"]) == {"rte", "piqa"}
    for argv, match in [(["--tasks", "rte,xyz"], "unknown zero-shot task"), (["--limit", "0"], "--limit"),
                        (["--tasks", "hellaswag"], "not bundled")]:
        assert main(["--quiet", "eval", "zeroshot", "--model", str(saved_model_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparsellm: error:") and match in err and len(err.strip().splitlines()) == 1, err


def test_cli_prune_with_zeroshot_eval(capsys, tmp_path, saved_model_dir, calib_txt):
    from sparsellm.cli import main

    assert main(["--quiet", "prune", "--model", str(saved_model_dir), "--calib_dataset", str(calib_txt),
                 "--nsamples", "2", "--seqlen", "16", "--eval", "zeroshot", "--tasks", "boolq", "--limit", "2",
                 "--eval_dense", "--save", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["eval"]["zeroshot"]["tasks"]["boolq"]["n"] == 2
    assert rep["eval_dense"]["zeroshot"]["tasks"]["boolq"]["n"] == 2
    assert "dense acc" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("content,match", [("not json\n", "not JSON lines"), ('{"a": 1}\n', "missing"),
                                           ("", "no HellaSwag rows"), ('[1, 2]\n', "missing")])
def test_bad_hellaswag_file(tmp_path, content, match):
    f = tmp_path / "h.jsonl"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        check_tasks(["hellaswag"], hellaswag_file=str(f))
    with pytest.raises(UsageError, match="not found"):
        check_tasks(["hellaswag"], hellaswag_file=str(tmp_path))
