"""Text sources, calibration windows and evaluation streams.

Calibration: `nsamples` windows of `seqlen` tokens, drawn with `seed` from a stream of documents
joined by the EOS token (algorithms.md §1.1, adapted to a small corpus: see SOURCES.md).
Evaluation: one long token stream cut into non-overlapping `seqlen` windows (algorithms.md §10.1).
"""

from __future__ import annotations

import gzip
import json
import random
from importlib import resources
from pathlib import Path


from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

CALIB_SOURCES = ("c4",)
EVAL_SOURCES = ("wikitext2", "c4")


def _bundled(name: str) -> Path:
    return Path(str(resources.files(__package__) / name))


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
                    docs.append(row["text"])
    except (UnicodeDecodeError, EOFError, OSError) as e:  # binary, truncated or not-gzip files
        raise UsageError(f"{path}: cannot be read as UTF-8 JSON lines ({type(e).__name__}: {e})") from None
    if not docs:
        raise UsageError(f"{path}: no rows with a non-empty 'text' field")
    return docs


def load_documents(source: str) -> list[str]:
    """Documents of a calibration source: "c4" (bundled) or a local .txt / .jsonl / .json.gz / .jsonl.gz
    file (JSON lines with a `text` field). Raises UsageError for a missing or unusable file."""
    if source == "c4":
        return _read_jsonl(_bundled("c4_calibration.jsonl.gz"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"calibration data not found: {source!r} (use 'c4' or a .txt/.jsonl/.json.gz file)")
    name = path.name.lower()
    if name.endswith(".txt"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise UsageError(f"{path}: empty text file")
        return [text]
    if name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
        return _read_jsonl(path)
    raise UsageError(f"{path}: unsupported calibration file type (use .txt, .jsonl, .json.gz or .jsonl.gz)")


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
