"""The zero-shot tasks sparsellm bundles and their checks, apart from lm-eval itself: the task table (lm-eval's
YAML and the bundled data file of each task), checking task names, `--limit` and a HellaSwag file, and
importing lm-eval offline. Settings validate zero-shot flags with these before any model is loaded, without
depending on `sparsellm.evaluate` (which runs the tasks: `evaluate.zeroshot`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

DATA = Path(__file__).resolve().parent / "zeroshot"
FILES = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq/val.jsonl.gz"),
    "rte": ("glue/rte/default.yaml", "rte/val.jsonl.gz"),
    "winogrande": ("winogrande/default.yaml", "winogrande/dev.jsonl.gz"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy/ARC-Easy-Test.jsonl.gz"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge/ARC-Challenge-Test.jsonl.gz"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/test.jsonl.gz"),
    "piqa": ("piqa/piqa.yaml", "piqa/valid.jsonl.gz"),
    "hellaswag": ("hellaswag/hellaswag.yaml", None),
}
TASKS = list(FILES)
PAPER_TASKS = ["boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]


def _offline_env() -> None:
    """Must run before `datasets` is imported: without it, every load_dataset("json") makes a HEAD request."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ.get(
        "SPARSELLM_CACHE", Path.home() / ".cache" / "sparsellm")) / "datasets"))


def require_lm_eval():
    """lm-eval, imported offline. Raises UsageError when the [zeroshot] extra is not installed."""
    _offline_env()
    try:
        import lm_eval
    except ImportError:
        raise UsageError("zero-shot evaluation needs lm-evaluation-harness: pip install 'sparsellm[zeroshot]' "
                         "(or make venv)") from None
    return lm_eval


def check_tasks(tasks: list[str], hellaswag_file: str | None = None, limit: int | None = None) -> list[str]:
    """Validate task names, the HellaSwag file and `limit` before any work. Raises UsageError."""
    if not tasks:
        raise UsageError("no zero-shot tasks given")
    for t in tasks:
        if t not in FILES:
            raise UsageError(f"unknown zero-shot task {t!r}; choose from {', '.join(TASKS)}")
    if "hellaswag" in tasks:
        if not hellaswag_file:
            raise UsageError("HellaSwag is not bundled (its data could not be obtained); pass a local copy of "
                             "hellaswag_val.jsonl with --hellaswag_file")
        _check_hellaswag(Path(hellaswag_file).expanduser())
    for t in tasks:
        if FILES[t][1] and not (DATA / FILES[t][1]).is_file():
            raise UsageError(f"bundled data file missing for {t}: {DATA / FILES[t][1]}")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be > 0, got {limit}")
    return list(dict.fromkeys(tasks))


def _check_hellaswag(path: Path) -> None:
    """The user's HellaSwag file: JSON lines with the fields lm-eval's hellaswag task reads."""
    import json

    if not path.is_file():
        raise UsageError(f"HellaSwag file not found: {path}")
    need = {"ctx_a", "ctx_b", "activity_label", "endings", "label"}
    rows = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                doc = json.loads(line)
                if not isinstance(doc, dict) or not need <= set(doc):
                    missing = sorted(need - set(doc)) if isinstance(doc, dict) else sorted(need)
                    raise UsageError(f"{path}:{n}: not a HellaSwag row (missing {', '.join(missing)})")
                if not isinstance(doc["endings"], list) or len(doc["endings"]) < 2:
                    raise UsageError(f"{path}:{n}: 'endings' must be a list of at least 2 strings")
                rows += 1
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON lines: {e}") from None
    if rows == 0:
        raise UsageError(f"{path} has no HellaSwag rows")
