"""Zero-shot accuracy with lm-evaluation-harness (0.4.x), offline (algorithms.md §10.2); a model larger than
the device runs on an accelerate device map (`offload.dispatched`).

Each task is lm-eval's own definition, read from the installed harness's YAML (prompt, choices, target,
metrics, verbatim), with only the data source replaced: the bundled files in `sparsellm/data/zeroshot/`
(SOURCES.md there), converted by `process_docs` below to the schema of the HF dataset the built-in task
reads. Nothing touches the network. HellaSwag is not bundled (it could not be obtained); pass a local
`hellaswag_val.jsonl` (the original release's format, which is the HF one) as `hellaswag_file`.

    results = zeroshot(model, tokenizer, ["boolq", "rte"], limit=100, batch_size=8)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path

from ..data.zeroshot_tasks import (DATA, FILES, PAPER_TASKS, TASKS, _check_hellaswag, _offline_env,  # noqa: F401
                                   check_tasks, require_lm_eval)
from ..errors import UsageError


# ------------------------------------------------------------------ local files -> the HF datasets' schema


def _arc(ds, stem_key="question"):
    def f(doc):
        q = doc["question"]
        return {stem_key: q["stem"], "choices": {"text": [c["text"] for c in q["choices"]],
                                                 "label": [c["label"] for c in q["choices"]]}}

    return ds.map(f, remove_columns=["question"])


def _boolq(ds):
    def label(doc):
        v = doc["label"]
        if isinstance(v, str):
            v = {"true": True, "false": False}[v.strip().lower()]
        return {"label": int(bool(v))}  # super_glue/boolq: 0 = False ("no"), 1 = True ("yes")

    return ds.map(label)


def _rte(ds):  # SuperGLUE RTE -> GLUE RTE: 0 = entailment ("True"), 1 = not_entailment ("False")
    return ds.map(lambda d: {"sentence1": d["premise"], "sentence2": d["hypothesis"],
                             "label": {"entailment": 0, "not_entailment": 1}[d["label"]]},
                  remove_columns=["premise", "hypothesis"])


def _piqa(ds):  # labels live in a separate file, one per line, in the same order
    labels = [int(x) for x in (DATA / "piqa" / "valid-labels.lst").read_text().split()]
    if len(labels) != len(ds):
        raise UsageError(f"PIQA: {len(labels)} labels for {len(ds)} questions")
    return ds.add_column("label", labels)


PROCESS = {"boolq": _boolq, "rte": _rte, "arc_easy": _arc, "arc_challenge": _arc, "piqa": _piqa,
           "openbookqa": lambda ds: _arc(ds, "question_stem"), "winogrande": None, "hellaswag": None}


# ------------------------------------------------------------------ task configs


def task_config(task: str, hellaswag_file: str | None = None) -> dict:
    """lm-eval's built-in config of `task` (installed YAML, includes and !function resolved), reading the
    bundled local file instead of the hub."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_rel, data_rel = FILES[task]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_rel)
    path = str(Path(hellaswag_file).expanduser().resolve()) if task == "hellaswag" else str(DATA / data_rel)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": path}},
               training_split=None, validation_split=None, test_split="test", fewshot_split=None)
    cfg.pop("tag", None)
    if PROCESS[task] is not None:
        cfg["process_docs"] = PROCESS[task]
    return cfg


@contextlib.contextmanager
def _silenced():
    """Nothing on stderr while lm-eval runs: its and datasets' progress bars and warnings (Python's stderr
    and warnings, their loggers) and what `git describe`, which lm-eval runs for its record, writes to the
    file descriptor ("fatal: not a git repository"). Exceptions still propagate."""
    import warnings

    names = ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def zeroshot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
             hellaswag_file: str | None = None, lm=None, progress: bool = True, device=None) -> dict:
    """Zero-shot accuracy of `model` on `tasks` through lm-eval's HFLM.

    limit: first N documents of each task (None: all). lm: an lm-eval LM to use instead of HFLM(model)
    (tests use an oracle). progress=False: nothing on stderr while lm-eval runs (`--quiet`). device: where
    lm-eval puts the inputs (default the model's device, that of its first parameter); give it for a model
    dispatched by accelerate (`offload.dispatched`), whose first parameter may be offloaded ("meta").
    Returns {"tasks": {task: {"acc", "acc_stderr", "acc_norm" (None where the task
    has none), "acc_norm_stderr", "n"}}, "mean_acc", "mean_acc_stderr" (tasks independent), "mean_acc_norm"
    (over the tasks that have it), "settings": {limit, batch size, lm-eval version, dtype, device,
    task_files (data and YAML with SHA-256)}, "warnings" (a --limit that leaves a standard error above 5
    points, also logged)}. Accuracies and standard errors are fractions in [0, 1].
    Raises UsageError for an unknown task, a missing file, or limit <= 0."""
    tasks = check_tasks(tasks, hellaswag_file, limit)
    require_lm_eval()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    with contextlib.nullcontext() if progress else _silenced():
        if lm is None:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            if device is not None:  # HFLM takes the first parameter's device, "meta" when it is offloaded
                lm._device = _torch().device(device)
        out = simple_evaluate(model=lm, tasks=[task_config(t, hellaswag_file) for t in tasks],
                              task_manager=TaskManager(include_defaults=False), limit=limit, num_fewshot=0,
                              bootstrap_iters=0, log_samples=False)
    res = {}
    for t in tasks:
        r, n = out["results"][t], out["n-samples"][t]["effective"]
        res[t] = {"acc": r.get("acc,none"), "acc_stderr": stderr(r.get("acc,none"), n),
                  "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": stderr(r.get("acc_norm,none"), n), "n": n}
    accs = [r["acc"] for r in res.values()]
    norms = [r["acc_norm"] for r in res.values() if r["acc_norm"] is not None]
    ses = [r["acc_stderr"] for r in res.values()]
    result = {"tasks": res, "mean_acc": sum(accs) / len(accs),
              "mean_acc_stderr": None if None in ses else math.sqrt(sum(x * x for x in ses)) / len(ses),
              "mean_acc_norm": sum(norms) / len(norms) if norms else None,
              "settings": {"limit": limit, "batch_size": batch_size, "num_fewshot": 0,
                           "lm_eval": _version(), **provenance(model, tasks, hellaswag_file, device)}}
    result["warnings"] = limit_warnings(result)
    for w in result["warnings"]:
        logging.getLogger("sparsellm").warning("sparsellm: warning: %s", w)
    return result


MAX_STDERR = 0.05  # 5 accuracy points: a --limit that leaves more is warned about


def stderr(acc: float | None, n: int) -> float | None:
    """Standard error of an accuracy over n documents: the sample standard deviation of the 0/1 scores over
    sqrt(n), sqrt(acc (1 − acc) / (n − 1)), lm-eval's `mean_stderr` in closed form (None for n < 2)."""
    if acc is None or n < 2:
        return None
    return math.sqrt(max(acc * (1 - acc), 0.0) / (n - 1))


def limit_warnings(result: dict) -> list[str]:
    """One line when `--limit` leaves any task's standard error above MAX_STDERR (5 points)."""
    limit = result["settings"]["limit"]
    wide = {t: r["acc_stderr"] for t, r in result["tasks"].items()
            if r["acc_stderr"] is not None and r["acc_stderr"] > MAX_STDERR}
    if limit is None or not wide:
        return []
    return [f"--limit {limit} leaves the standard error of " + ", ".join(f"{t} at {100 * v:.1f}"
            for t, v in wide.items()) + f" points, above {100 * MAX_STDERR:.0f}: differences smaller than about twice "
            "that are noise; raise --limit"]


def provenance(model, tasks: list[str], hellaswag_file: str | None = None, device=None) -> dict:
    """What the scores depend on besides lm-eval's version: the model's dtype and device (`device` when
    given), and for each task its data file and lm-eval YAML with their SHA-256."""
    from ..data import file_sha256

    lm_eval = require_lm_eval()
    param = next(model.parameters(), None) if model is not None else None
    files = {}
    for t in tasks:
        yaml_rel, data_rel = FILES[t]
        data = Path(hellaswag_file).expanduser() if t == "hellaswag" else DATA / data_rel
        yaml = Path(lm_eval.__file__).parent / "tasks" / yaml_rel
        files[t] = {"data": str(data) if t == "hellaswag" else f"sparsellm/data/zeroshot/{data_rel}",
                    "data_sha256": file_sha256(data), "yaml": yaml_rel, "yaml_sha256": file_sha256(yaml)}
    return {"dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
            "device": str(device) if device is not None else str(param.device) if param is not None else None,
            "task_files": files}


def _torch():
    import torch

    return torch


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

