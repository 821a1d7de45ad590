"""Calibration windows, local corpus formats, and the bundled WikiText-2 / C4 text."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import sentences
from sparsellm import data
from sparsellm.data import calibration_windows, load_documents
from sparsellm.errors import UsageError


def _stream(tokenizer, docs):
    """The EOS-joined token stream, built here one document at a time."""
    out = []
    for d in docs:
        out += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


def _find(stream, window):
    w = window.tolist()
    n = len(w)
    return [i for i in range(len(stream) - n + 1) if stream[i : i + n] == w]


@pytest.fixture
def docs():
    return sentences(80, seed=3)


@pytest.fixture
def jsonl(tmp_path, docs):
    p = tmp_path / "corpus.jsonl"
    rows = [{"text": d, "url": f"u{i}"} for i, d in enumerate(docs)]
    rows.insert(5, {"text": "   "})  # blank text: skipped
    rows.insert(9, {"url": "no text"})  # no text field: skipped
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return p


def test_windows_shape_dtype_and_taken_from_stream(tokenizer, jsonl, docs):
    w = calibration_windows(tokenizer, str(jsonl), 6, 16, seed=0)
    assert w.shape == (6, 16) and w.dtype == torch.int64
    stream = _stream(tokenizer, docs)
    starts = []
    for row in w:
        pos = _find(stream, row)
        assert len(pos) == 1, "every window is one contiguous slice of the EOS-joined stream"
        starts.append(pos[0])
    starts.sort()
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:])), "windows overlap"
    # all windows sit on one chunk grid: same offset modulo seqlen
    assert len({s % 16 for s in starts}) == 1


def test_windows_deterministic_and_seed_dependent(tokenizer, jsonl):
    a = calibration_windows(tokenizer, str(jsonl), 4, 16, seed=0)
    b = calibration_windows(tokenizer, str(jsonl), 4, 16, seed=0)
    c = calibration_windows(tokenizer, str(jsonl), 4, 16, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_can_use_the_whole_stream(tokenizer, jsonl, docs):
    n = len(_stream(tokenizer, docs)) // 16
    w = calibration_windows(tokenizer, str(jsonl), n, 16, seed=5)
    assert w.shape == (n, 16)
    assert len({tuple(r) for r in w.tolist()}) == n


def test_too_short_corpus(tokenizer, jsonl, docs):
    total = len(_stream(tokenizer, docs))
    calibration_windows(tokenizer, str(jsonl), 1, total, seed=0)  # exactly enough
    with pytest.raises(UsageError, match="fewer than"):
        calibration_windows(tokenizer, str(jsonl), 1, total + 1, seed=0)
    with pytest.raises(UsageError):
        calibration_windows(tokenizer, str(jsonl), 0, 16, seed=0)
    with pytest.raises(UsageError):
        calibration_windows(tokenizer, str(jsonl), 2, 1, seed=0)


def test_formats_txt_jsonl_jsongz(tmp_path, tokenizer, jsonl, docs):
    gz = tmp_path / "corpus.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    jgz = tmp_path / "corpus.jsonl.gz"
    jgz.write_bytes(gz.read_bytes())
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(docs), encoding="utf-8")

    assert load_documents(str(jsonl)) == docs
    assert load_documents(str(gz)) == docs
    assert load_documents(str(jgz)) == docs
    assert load_documents(str(txt)) == ["\n".join(docs)]
    w1 = calibration_windows(tokenizer, str(jsonl), 3, 16, seed=2)
    w2 = calibration_windows(tokenizer, str(gz), 3, 16, seed=2)
    assert torch.equal(w1, w2)
    wt = calibration_windows(tokenizer, str(txt), 3, 16, seed=2)
    stream = _stream(tokenizer, ["\n".join(docs)])
    for row in wt:
        assert len(_find(stream, row)) == 1


@pytest.mark.parametrize("name,content,match", [
    ("missing.jsonl", None, "not found"),
    ("empty.txt", "  \n", "empty"),
    ("bad.jsonl", '{"text": "a b"}\n{oops\n', ":2:"),
    ("notext.jsonl", '{"body": "a"}\n[1, 2]\n', "no rows"),
    ("data.parquet", "x", "unsupported"),
])
def test_bad_corpus_files(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_documents(str(p))


# ------------------------------------------------------------------ bundled text


def _raw_rows():
    path = data._bundled("wikitext2_test.raw.gz")
    raw = gzip.open(path, "rb").read().decode("utf-8")
    assert "\r\n" in raw
    return [ln for ln in raw.split("\r\n") if ln]


def test_wikitext2_text_begins_like_the_hf_split():
    text = data.wikitext2_test_text()
    # HF rows: "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n", ... joined with "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert "\r" not in text
    assert text.endswith("Eddie Pelkey . \n")


def test_wikitext2_join_rule():
    """Rebuild the HF row list independently: one empty row before and after every heading row, every row
    keeps its trailing newline, rows joined by a blank line."""
    rows = []
    for r in _raw_rows():
        words = r.split()
        heading = len(words) >= 3 and words[0] == "=" and words[-1] == "="
        rows += ["", r + "\n", ""] if heading else [r + "\n"]
    expected = "\n\n".join(rows)
    text = data.wikitext2_test_text()
    assert text == expected
    nonempty = _raw_rows()
    assert len(nonempty) == 2891
    headings = [r for r in nonempty if r.strip().startswith("= ") and r.strip().endswith(" =")]
    assert len(headings) == 706
    assert rows.count("") == 2 * len(headings)
    assert "\n\n = = Career = = \n\n\n\n" in text


def test_c4_calibration_and_validation_are_disjoint():
    calib = load_documents("c4")
    with gzip.open(data._bundled("c4_validation.jsonl.gz"), "rt", encoding="utf-8") as f:
        val_rows = [json.loads(line) for line in f if line.strip()]
    val = [r["text"] for r in val_rows]
    assert len(calib) == 944 and len(val) == 1100
    assert not set(calib) & set(val)
    calib_rows = [json.loads(line) for line in gzip.open(data._bundled("c4_calibration.jsonl.gz"), "rt")]
    assert not {r.get("url") for r in calib_rows} & {r.get("url") for r in val_rows}
    assert data.c4_validation_text() == " ".join(val[:1100])


def test_eval_tokens_c4_is_truncated(tokenizer, monkeypatch):
    text = " ".join(sentences(300, seed=9))  # ~3,000 tokens, more than 256 x 4
    monkeypatch.setattr(data, "c4_validation_text", lambda: text)
    ids = data.eval_tokens(tokenizer, "c4", seqlen=4)
    assert ids.shape == (1, 256 * 4) and ids.dtype == torch.int64
    assert ids[0].tolist() == [
        tokenizer.convert_tokens_to_ids(w) for w in text.split()[: 256 * 4]]
    wt = data.eval_tokens(tokenizer, "c4", seqlen=1000)  # shorter than 256 x seqlen: not truncated
    assert wt.shape[1] == len(text.split())


def test_eval_tokens_unknown(tokenizer):
    with pytest.raises(UsageError):
        data.eval_tokens(tokenizer, "lambada", 16)
