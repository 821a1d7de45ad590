"""Settings shared by every run, as small dataclasses that runs compose (never copy): which model,
the calibration windows, the evaluation and the outputs.

Each field is declared with `setting(default, help, ...)`, and the command line builds its flags from these
fields (`sparsellm.cli.common.add_config`), so a default is written once, here or in a method's own config
(`prune/*.py`, `allocate/*.py`, ...). Every config has `validate()`, which raises UsageError for bad values
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .devices import DEVICE_HELP, DTYPE_HELP, DTYPES
from .errors import UsageError

EVAL_SEQLEN = 2048  # the papers' perplexity window, capped at the model's context
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # what a model may be saved in (models/save.py)


def setting(default=None, help: str = "", *, aliases: tuple[str, ...] = (), choices=None, flag: str | None = None,
            metavar: str | None = None):
    """A config field with what its command-line flag needs: help text, extra spellings (`aliases`),
    allowed values (`choices`) and the flag's name when it is not `--<field name>`."""
    meta = {"help": help, "aliases": tuple(aliases), "choices": choices, "flag": flag, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def replace(config, **changes):
    """A copy of `config` with `changes` (dataclasses.replace, for readability at call sites)."""
    return dataclasses.replace(config, **changes)


def nested(f: dataclasses.Field):
    """The config class of a field that holds a nested config (declared with default_factory=Class), else None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def flat_names(cls) -> list[str]:
    """The settings of config class `cls` and of the configs nested in it, by name."""
    out = []
    for f in dataclasses.fields(cls):
        sub = nested(f)
        out += flat_names(sub) if sub else [f.name]
    return out


def flat_defaults(cls) -> dict:
    """{setting name: default} of config class `cls`, nested configs flattened in (flag fields only)."""
    out = {}
    for f in dataclasses.fields(cls):
        if nested(f):
            out.update(flat_defaults(nested(f)))
        elif "help" in f.metadata:
            out[f.name] = f.default
    return out


def build(cls, settings: dict):
    """An instance of config class `cls` (and its nested configs) from the keys of `settings` that are its
    fields; others are ignored."""
    kw = {}
    for f in dataclasses.fields(cls):
        sub = nested(f)
        if sub:
            kw[f.name] = build(sub, settings)
        elif f.name in settings:
            kw[f.name] = settings[f.name]
    return cls(**kw)


def flatten(config) -> dict:
    """A config's settings and those of the configs nested in it, as one flat dict ({} for a non-config)."""
    if not dataclasses.is_dataclass(config):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(flatten(value) if nested(f) else {f.name: value})
    return out


def at_least(config, names: tuple[str, ...], least: int = 1) -> None:
    """UsageError unless every field in `names` that is not None is >= `least`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and int(value) < least:
            raise UsageError(f"--{name} must be >= {least}, got {value}")


def check_finite(config) -> None:
    """UsageError for any float setting of `config` (a config or run dataclass, walked through its nested
    configs, lists and dicts) that is NaN or ±inf; the message names the flag. Every float setting must be a
    finite number; each config's `validate()` checks its own ranges."""
    if isinstance(config, (list, tuple)):
        for item in config:
            check_finite(item)
    elif isinstance(config, dict):
        for item in config.values():
            check_finite(item)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name} must be a finite number, got {value}")
            check_finite(value)


def positive_ints(spec: str, flag: str) -> list[int]:
    """A comma-separated list of integers >= 1 (e.g. "128,512"). Raises UsageError naming `flag`."""
    try:
        vals = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {spec!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} must be integers >= 1, got {spec!r}")
    return vals


def check_model_spec(model) -> None:
    """Raises UsageError for a missing or blank --model."""
    if model is None or not str(model).strip():
        raise UsageError("--model is empty: give a preset name, a .gguf file, an HF directory or a hub id")


@dataclass
class ModelSource:
    """The input model, the device its forwards run on and their precision (`sparsellm.devices`)."""

    model: str = setting("smollm2-135m", "HF hub id, local HF directory, .gguf file or preset (smollm2-135m)")
    dtype: str = setting("auto", DTYPE_HELP, choices=DTYPES)
    device: str = setting("auto", DEVICE_HELP, metavar="{auto,cpu,cuda,cuda:N}")
    load: str = setting("auto", "memory: load the whole model; lazy: read each decoder block from the checkpoint's "
                                "safetensors only when its turn comes (memory bounded by about two blocks; an HF "
                                "directory, a hub id or a GGUF file, converted once); auto: lazy when the model in "
                                "the forward dtype would take more than half of the free memory",
                        choices=("auto", "memory", "lazy"))

    def resolve(self):
        """(torch.device, torch.dtype) of this run's forwards. --dtype auto on a GPU reads the dtype the
        checkpoint declares (float16 stays float16). Raises UsageError (see `devices`)."""
        from .devices import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        stored = None
        if self.dtype == "auto" and device.type == "cuda":
            from .models.load import declared_dtype

            stored = declared_dtype(self.model)
        return device, resolve_dtype(self.dtype, device, stored)

    def torch_dtype(self):
        """The forward dtype (`resolve`)."""
        return self.resolve()[1]

    def validate(self) -> "ModelSource":
        from .devices import check_device_spec, check_dtype_spec

        check_model_spec(self.model)
        check_dtype_spec(self.dtype)
        check_device_spec(self.device)
        if self.load not in ("auto", "memory", "lazy"):
            raise UsageError(f"--load must be auto, memory or lazy; got {self.load!r}")
        return self


@dataclass
class Calibration:
    """`nsamples` windows of `seqlen` tokens drawn with `seed` from `calib_dataset`; `batch_size` windows
    go through a block per forward (None: about 2048 tokens per forward, at least one window)."""

    nsamples: int = setting(128, "calibration windows")
    seqlen: int = setting(2048, "tokens per calibration window (capped at the model's context)",
                          aliases=("--calib_seqlen",))
    calib_dataset: str = setting("c4", "c4 (bundled) or a local .txt / .jsonl / .json.gz / .jsonl.gz file with a "
                                       "'text' field")
    seed: int = setting(0, "seed for drawing calibration windows")
    batch_size: int | None = setting(None, "calibration windows per block forward (default: about 2048 tokens per "
                                           "forward, at least one window)")

    def validate(self, check_file: bool = False) -> "Calibration":
        """Raises UsageError for counts below 1 (seqlen below 2) and, with `check_file`, an unusable file."""
        at_least(self, ("nsamples", "batch_size"))
        at_least(self, ("seqlen",), 2)
        if check_file and self.calib_dataset != "c4":
            from .data import load_documents

            load_documents(self.calib_dataset)
        return self


@dataclass
class Evaluation:
    """What is scored after a run: perplexity datasets and/or zero-shot tasks (`eval`, comma-separated or
    "none"), with windows of `eval_seqlen` tokens (the papers' 2048, capped at the model's context),
    `eval_batch_size` of them per forward (zero-shot's batch is `zeroshot_batch_size`, lm-eval's)."""

    eval: str = setting("wikitext2", "comma-separated: wikitext2, c4 (perplexity), zeroshot (lm-eval, see --tasks), "
                                     "or none")
    eval_seqlen: int = setting(EVAL_SEQLEN, "window length for perplexity (capped at the model's context)")
    max_windows: int | None = setting(None, "score only the first N windows")
    eval_dense: bool = setting(False, "also evaluate the input model first")
    eval_batch_size: int = setting(1, "perplexity windows per forward (the same perplexity as 1, up to float "
                                      "rounding; the logits of a batch are held at once)", metavar="N")
    tasks: str = setting("boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa",
                         "zero-shot tasks, comma-separated, from: boolq, rte, winogrande, arc_easy, arc_challenge, "
                         "openbookqa, piqa, hellaswag")
    limit: int | None = setting(None, "zero-shot: first N documents of each task")
    zeroshot_batch_size: int = setting(8, "zero-shot batch size", metavar="N")
    hellaswag_file: str | None = setting(None, "local hellaswag_val.jsonl (HellaSwag is not bundled: its data could "
                                               "not be obtained)")

    def names(self, zeroshot_ok: bool = True) -> list[str]:
        """The evaluations asked for, in order. Raises UsageError for an unknown one."""
        from .data import EVAL_SOURCES

        allowed = EVAL_SOURCES + (("zeroshot",) if zeroshot_ok else ())
        names = [] if self.eval.strip().lower() == "none" else [s.strip() for s in self.eval.split(",") if s.strip()]
        for n in names:
            if n not in allowed:
                raise UsageError(f"unknown evaluation {n!r}; choose from {', '.join(allowed)} or none")
        return names

    def zeroshot_tasks(self) -> list[str]:
        """The zero-shot tasks when zero-shot is asked for (validated, lm-eval installed), else []."""
        if "zeroshot" not in self.names():
            return []
        from .data.zeroshot_tasks import check_tasks, require_lm_eval

        if self.zeroshot_batch_size < 1:
            raise UsageError(f"zero-shot batch size must be >= 1, got {self.zeroshot_batch_size}")
        tasks = check_tasks([t.strip() for t in self.tasks.split(",") if t.strip()], self.hellaswag_file, self.limit)
        require_lm_eval()
        return tasks

    def validate(self) -> "Evaluation":
        self.names()
        self.zeroshot_tasks()
        at_least(self, ("max_windows", "eval_batch_size"))
        at_least(self, ("eval_seqlen",), 2)
        return self


@dataclass
class Output:
    """Where a run writes: `out` (the model directory with its reports), `save` (reports only), whether a
    non-empty `out` may be replaced, and the dtype the model's weights are saved in (`save_dtype`, see
    `sparsellm.models.save.resolve_save_dtype`; the in-memory model keeps its own)."""

    out: str | None = setting(None, "output directory: the model, report.json, report.md and figures",
                              aliases=("--save_model",))
    save: str | None = setting(None, "directory to write report.json and report.md into (no model)")
    overwrite: bool = setting(False, "replace a non-empty --out directory, and a run record already in --save")
    save_dtype: str = setting("auto", "dtype of the saved weights: auto is the input checkpoint's declared dtype "
                                      "(bfloat16 for a GGUF source); zeros stay exact in every dtype",
                              choices=SAVE_DTYPES)

    def validate(self) -> "Output":
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        return self
