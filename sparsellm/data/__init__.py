"""Text sources, calibration windows and evaluation streams.

Calibration: `nsamples` windows of `seqlen` tokens, drawn with `seed` from a stream of documents
joined by the EOS token (algorithms.md §1.1, adapted to a small corpus: see SOURCES.md).
Evaluation: one long token stream cut into non-overlapping `seqlen` windows (algorithms.md §10.1).
Rows of a JSON-lines file without a non-empty `text` string are dropped and counted (`corpus_rows`, in the
run record and a log line); a file with more than MAX_DROPPED_SHARE (10%) of its rows dropped is refused.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import random
from importlib import resources
from pathlib import Path


from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

CALIB_SOURCES = ("c4",)
EVAL_SOURCES = ("wikitext2", "c4")
MAX_DROPPED_SHARE = 0.10  # a data file with more than 10% unusable rows is refused, not silently thinned


def _bundled(name: str) -> Path:
    return Path(str(resources.files(__package__) / name))


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_rows(path, rows: int, dropped: int, first_dropped: int | None, why: str, unit: str = "line") -> dict:
    """The row count of a data file, {"file", "rows_used", "rows_dropped", "first_dropped_line"}.

    rows: non-blank rows read; dropped: those unusable (`why` says what they lack); first_dropped: the
    1-based `unit` ("line", or "row" of a JSON list) of the first. Raises UsageError when more than MAX_DROPPED_SHARE (10%) of
    the rows are dropped, naming the file and the first dropped line."""
    if rows and dropped / rows > MAX_DROPPED_SHARE:
        raise UsageError(f"{path}: {dropped} of {rows} rows dropped ({why}), more than the "
                         f"{MAX_DROPPED_SHARE:.0%} allowed; the first at {unit} {first_dropped}")
    return {"file": str(path), "rows_used": rows - dropped, "rows_dropped": dropped,
            f"first_dropped_{unit}": first_dropped}


def _read_jsonl(path: Path) -> list[str]:
    return list(_counted_jsonl(path)[0])


def _counted_jsonl(path: Path) -> tuple[tuple[str, ...], dict]:
    st = path.stat()
    return _counted_jsonl_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _counted_jsonl_cached(name: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], dict]:
    """(documents, row count) of a JSON-lines file: rows with a non-empty string `text` are used, the
    others are counted as dropped (check_rows refuses more than 10%); a row that is not JSON is an error."""
    path = Path(name)
    opener = gzip.open if path.name.endswith(".gz") else open
    docs, rows, dropped, first = [], 0, 0, None
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                rows += 1
                if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
                    docs.append(row["text"])
                else:
                    dropped, first = dropped + 1, first or lineno
    except (UnicodeDecodeError, EOFError, OSError) as e:  # binary, truncated or not-gzip files
        raise UsageError(f"{path}: cannot be read as UTF-8 JSON lines ({type(e).__name__}: {e})") from None
    if not docs:
        raise UsageError(f"{path}: no rows with a non-empty 'text' field")
    count = check_rows(path, rows, dropped, first, "no non-empty 'text' string")
    return tuple(docs), {**count, "sha256": file_sha256(path)}


def _source_path(source: str) -> Path:
    """The file of a calibration source. Raises UsageError for a missing file or an unsupported type."""
    if source == "c4":
        return _bundled("c4_calibration.jsonl.gz")
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"calibration data not found: {source!r} (use 'c4' or a .txt/.jsonl/.json.gz file)")
    if not path.name.lower().endswith((".txt", ".jsonl", ".json.gz", ".jsonl.gz")):
        raise UsageError(f"{path}: unsupported calibration file type (use .txt, .jsonl, .json.gz or .jsonl.gz)")
    return path


def load_documents(source: str) -> list[str]:
    """Documents of a calibration source: "c4" (bundled) or a local .txt / .jsonl / .json.gz / .jsonl.gz
    file (JSON lines with a `text` field). Rows without a non-empty `text` string are dropped and counted
    (`corpus_rows`). Raises UsageError for a missing or unusable file, or more than 10% of its rows dropped."""
    path = _source_path(source)
    if path.name.lower().endswith(".txt"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise UsageError(f"{path}: empty text file")
        return [text]
    return _read_jsonl(path)


def corpus_rows(source: str) -> dict:
    """What was read from a calibration source: {"file", "rows_used", "rows_dropped", "first_dropped_line",
    "sha256" (of the file's bytes)}; a .txt file is one row. Raises UsageError as `load_documents`."""
    path = _source_path(source)
    if path.name.lower().endswith(".txt"):
        load_documents(source)
        return {"file": str(path), "rows_used": 1, "rows_dropped": 0, "first_dropped_line": None,
                "sha256": file_sha256(path)}
    return dict(_counted_jsonl(path)[1])


def wikitext2_test_text() -> str:
    """WikiText-2 raw test joined as the papers do: `"\\n\\n".join(rows)` of the HF split, with the
    empty rows around ` = heading = ` lines restored (see SOURCES.md for what cannot be restored)."""
    with gzip.open(_bundled("wikitext2_test.raw.gz"), "rt", encoding="utf-8", newline=None) as f:
        lines = f.read().split("\n")
    rows: list[str] = []
    for line in lines:
        if not line:
            continue
        s = line.strip()
        if s.startswith("= ") and s.endswith(" ="):
            rows += ["", line + "\n", ""]
        else:
            rows.append(line + "\n")
    return "\n\n".join(rows)


def c4_validation_text() -> str:
    """The first 1,100 bundled C4 validation documents joined with spaces (SparseGPT's C4 protocol)."""
    return " ".join(_read_jsonl(_bundled("c4_validation.jsonl.gz"))[:1100])


EVAL_FILES = {"wikitext2": ("test", "wikitext2_test.raw.gz"), "c4": ("validation", "c4_validation.jsonl.gz")}


@functools.lru_cache(maxsize=None)
def eval_source(dataset: str) -> dict:
    """Where an evaluation dataset's text comes from: {"split", "file" (inside the package), "sha256" (of the
    bundled file's bytes)}; all None for a name that is not a bundled evaluation dataset."""
    if dataset not in EVAL_FILES:
        return {"split": None, "file": None, "sha256": None}
    split, name = EVAL_FILES[dataset]
    return {"split": split, "file": f"sparsellm/data/{name}", "sha256": file_sha256(_bundled(name))}


def eval_tokens(tokenizer, dataset: str, seqlen: int) -> torch.Tensor:
    """The evaluation token stream, shape (1, T), int64. For "c4" it is truncated to 256 × seqlen
    tokens (SparseGPT's protocol). Raises UsageError for an unknown dataset."""
    if dataset == "wikitext2":
        text = wikitext2_test_text()
    elif dataset == "c4":
        text = c4_validation_text()
    else:
        raise UsageError(f"unknown evaluation dataset {dataset!r}; choose from {', '.join(EVAL_SOURCES)}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if dataset == "c4":
        ids = ids[:, : 256 * seqlen]
    return ids


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` non-overlapping random windows of `seqlen` tokens, shape (nsamples, seqlen), int64.

    Documents are tokenized one by one and joined with the EOS token into one stream; the stream is cut
    into seqlen-token chunks from a random offset and `nsamples` chunks are drawn, all with Python's
    `random.Random(seed)`. Raises UsageError if the stream is shorter than nsamples × seqlen tokens."""
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    docs = load_documents(source)
    rows = corpus_rows(source)
    log.info("calibration data %s: %d rows used, %d dropped%s", source, rows["rows_used"], rows["rows_dropped"],
             f" (first at line {rows['first_dropped_line']}: no non-empty 'text')" if rows["rows_dropped"] else "")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False).input_ids:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    total = len(stream)
    if total < nsamples * seqlen:
        raise UsageError(
            f"calibration corpus {source!r} has {total} tokens, fewer than nsamples × seqlen = "
            f"{nsamples} × {seqlen} = {nsamples * seqlen}; lower --nsamples or --seqlen"
        )
    rng = random.Random(seed)
    nchunks = total // seqlen
    offset = rng.randint(0, total - nchunks * seqlen)
    starts = sorted(rng.sample(range(nchunks), nsamples))
    data = torch.tensor(stream, dtype=torch.long)
    return torch.stack([data[offset + c * seqlen : offset + (c + 1) * seqlen] for c in starts])
