"""The run-directory writer: the one place that checks an output directory and writes a run into it.

    rd = RunDir.prepare("out/w50", inputs=[model_dir, calib_file], overwrite=False)   # before any work
    rd.write(record.to_dict(), markdown, model_writer=pruned_model(model, tok, prune_report), figures=...)

A model directory (`replaces=True`) is written whole into a temporary directory and swapped into place
(`outputs.atomic_dir_write`), so an interrupted run leaves the old directory or the new one, never a mix.
A reports directory (`replaces=False`, e.g. `--save`) is added to: each file is written atomically.
An evaluation saved into the evaluated model's own run directory is added to that run's record
(`run_record`, `add_to_record`): report.json and report.md are rewritten atomically, nothing else is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..outputs import apply_umask, atomic_dir_write, check_output_dir, write_json_atomic, write_text_atomic


@dataclass
class RunDir:
    """An output directory checked before any work. `replaces`: a model directory replaced whole (must be
    empty unless `overwrite`); otherwise a reports directory whose listed files are replaced."""

    path: Path
    overwrite: bool = False
    replaces: bool = True

    @classmethod
    def prepare(cls, path, inputs=(), overwrite: bool = False, replaces: bool = True) -> "RunDir | None":
        """Check `path` (None: no directory) against the `inputs` (paths read by the run, or None): not an
        input, not inside one, not containing one when it replaces; empty unless `overwrite`; writable.
        Raises UsageError."""
        if path is None:
            return None
        out = check_output_dir(path, overwrite or not replaces, list(inputs), replaces=replaces)
        return cls(out, overwrite, replaces)

    def check_input(self, model_dir) -> None:
        """Check again against the directory the model was actually loaded from (known after loading)."""
        if model_dir is not None:
            check_output_dir(self.path, self.overwrite or not self.replaces, [model_dir], replaces=self.replaces)

    def refuse_replacing_record(self) -> None:
        """UsageError if this reports directory already holds a run record (report.json) and `overwrite` is
        off: writing would replace another run's record with one that does not describe that run's files."""
        if not self.overwrite and (self.path / "report.json").exists():
            raise UsageError(f"--save {self.path} already holds a run record (report.json); choose another "
                             "directory, or pass --overwrite to replace it")

    def refuse_overwriting(self, names, inputs) -> None:
        """UsageError if writing `names` into a reports directory would replace one of the input files."""
        written = {(self.path / n).resolve() for n in names}
        for p in inputs:
            if p is not None and Path(p).expanduser().resolve() in written:
                raise UsageError(f"--save {self.path} would overwrite the input file {p}")

    def write(self, record: dict | None = None, markdown: str | None = None, *,
              model_writer: Callable[[Path], None] | None = None, json_files: dict | None = None,
              figures: dict | None = None, files: dict | None = None) -> Path:
        """Write `report.json` (`record`), `report.md`, other JSON files {name: object}, `figures` and other
        `files` ({name: function(path)}), and for a model directory first the model (`model_writer(dir)`)."""

        def fill(d: Path):
            if model_writer is not None:
                model_writer(d)
            if record is not None:
                write_json_atomic(d / "report.json", record)
            if markdown is not None:
                write_text_atomic(d / "report.md", markdown)
            for name, obj in (json_files or {}).items():
                write_json_atomic(d / name, obj)
            for name, draw in {**(figures or {}), **(files or {})}.items():
                draw(d / name)

        if self.replaces:
            atomic_dir_write(self.path, fill)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            fill(self.path)
            for name in files or {}:  # written by the caller's functions: the umask's modes, like the rest
                apply_umask(self.path / name)
        return self.path


def pruned_model(model, tokenizer, prune_report: dict, save_dtype: str = "auto") -> Callable[[Path], None]:
    """A model writer: the HF directory (safetensors with exact zeros in `save_dtype`, see
    `sparsellm.models.save.save_model`; config, tokenizer) plus the `sparsity_config.json` sidecar."""
    from ..models.save import save_model
    from ..pipeline import sparsity_sidecar

    def write(d: Path):
        save_model(model, d, save_dtype)
        tokenizer.save_pretrained(d)
        write_json_atomic(d / "sparsity_config.json", sparsity_sidecar(model, prune_report))

    return write


def save_pruned(model, tokenizer, out_dir, report: dict, run_report: dict | None = None, markdown: str = "",
                overwrite: bool = False, figures: dict | None = None, files: dict | None = None,
                save_dtype: str = "auto") -> Path:
    """Write an HF directory (safetensors, exact zeros, tokenizer) plus `sparsity_config.json` (from the
    prune `report`), `report.json` (`run_report`, default `report`), `report.md`, `figures` and `files`
    ({file name: function(path)}) atomically: a temporary directory renamed into place at the end, so a
    failure never leaves a partial model. The weights are written in `save_dtype` ("auto": the input
    checkpoint's declared dtype; "float32", "bfloat16", "float16"); the in-memory model is not changed.
    Raises UsageError, before writing anything, if `out_dir` overlaps the model's own directory or is
    non-empty and not `overwrite`, for an unknown `save_dtype`, or if adapters are still attached (merge
    them first: `sparsellm.adapt.remove_adapters(model)`)."""
    from ..models.save import check_loadable, resolve_save_dtype

    resolve_save_dtype(model, save_dtype)
    check_loadable(model)
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    rd = RunDir.prepare(out_dir, [source if str(source) and source.exists() else None], overwrite)
    return rd.write(run_report or report, markdown, model_writer=pruned_model(model, tokenizer, report, save_dtype),
                    figures=figures, files=files)


def run_record(save, model_dir) -> Path | None:
    """The directory whose run record an evaluation adds to: `save` when it is the evaluated model's own
    directory (`model_dir`) and holds a run's report.json; None when `save` is another directory (or None).
    Raises UsageError when `save` is the model's directory without a run record (it would write into an
    input model), or another run's directory (its record would be replaced by the evaluation's)."""
    from ..compare import load_run

    if save is None:
        return None
    out = Path(save).expanduser()
    own = model_dir is not None and out.resolve() == Path(model_dir).expanduser().resolve()
    if not (out / "report.json").is_file():
        if own:
            raise UsageError(f"--save {save} is the model's directory and holds no run record (report.json); "
                             "choose another directory")
        return None
    run, _ = load_run(out)
    if own:
        return out
    if not str(run.get("command", "")).startswith("eval"):
        raise UsageError(f"--save {save} holds the record of another run ({run.get('command')} of "
                         f"{run.get('model')}); evaluate that run's model (--model {save}) or choose another directory")
    return None


def check_additions(run_dir: Path, keys, overwrite: bool) -> None:
    """UsageError when the record in `run_dir` already holds a result under one of `keys`, unless `overwrite`."""
    from ..compare import load_run

    have = [k for k in keys if k in (load_run(run_dir)[0].get("eval") or {})]
    if have and not overwrite:
        raise UsageError(f"{run_dir / 'report.json'} already holds {', '.join(have)}; pass --overwrite to replace it")


def add_to_record(run_dir: Path, metrics: dict, added: dict, overwrite: bool = False, warnings=()) -> dict:
    """Add evaluation `metrics` ({name: result}) to the run record in `run_dir`: merged into its "eval", with
    `added` (the evaluation's command, settings, versions) appended to "eval_added"; report.json and
    report.md are written atomically, the model files are not touched. Returns the new record. Raises
    UsageError for a result already there, unless `overwrite`. `warnings` are added to the run's warnings."""
    from ..compare import load_run
    from ..report import markdown, search_markdown

    check_additions(run_dir, metrics, overwrite)
    run = load_run(run_dir)[0]
    run["eval"] = {**(run.get("eval") or {}), **metrics}
    run.setdefault("eval_added", []).append({**added, "metrics": list(metrics)})
    if warnings:
        run["warnings"] = [*(run.get("warnings") or []), *warnings]
    write_json_atomic(run_dir / "report.json", run)
    write_text_atomic(run_dir / "report.md", search_markdown(run) if run.get("command") == "search" else markdown(run))
    return run
