"""A streamed prune: the lazy model's pruned blocks go into the output's shards as they are done, and an
interrupted run continues from the last finished block (`--resume`).

    OUT.partial/                       what the run has written so far (never looks like a finished model)
        model-0000k-of-0000N.safetensors   block k − 1, written atomically when it is finished
        resume.json                    the run's settings and input fingerprint, the finished blocks' reports
        inputs-0000k.pt                block k's inputs (and the dense stream's), as the engine left them

At the end the last shard (embeddings, final norm, head), the index, config.json, the tokenizer and the
sidecar are written into OUT.partial, and the whole directory becomes OUT through `RunDir.write` (a
temporary directory of hard links swapped into place), after which OUT.partial is removed. A resumed run
gives byte-identical shards: the engine restarts block k from the very inputs it saved for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from ..errors import UsageError
from ..lazy import lazy_import
from ..outputs import write_json_atomic

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

STATE = "resume.json"


def _inputs(k: int) -> str:
    """The file of block k's inputs (and the dense stream's), as the engine left them after block k − 1."""
    return f"inputs-{k:05d}.pt"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def partial_dir(out) -> Path:
    """Where a streamed prune into `out` keeps its progress: OUT.partial next to it."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".partial")


def output_bytes(shapes, save_dtype) -> int:
    """Bytes of a checkpoint with tensors of `shapes` (an iterable of shape tuples) in `save_dtype`."""
    return sum(math.prod(s) for s in shapes) * save_dtype.itemsize


def check_room(out, nbytes: int, already: int = 0) -> None:
    """UsageError when the disk that will hold `out` has less than `nbytes` (less `already` written) free,
    with a 5% margin."""
    anc = Path(out).expanduser().resolve()
    while not anc.exists():
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    need = max(0, nbytes - already)
    if need * 1.05 > free:
        raise UsageError(f"--out {out}: the model needs about {need / 2**30:.2f} GiB more and the disk has "
                         f"{free / 2**30:.2f} GiB free")


_IMPLIED = {"engine": "block"}  # settings added since a run may have started, and the value it had

class Partial:
    """OUT.partial: the progress of a streamed prune (see the module doc). It is created when the first
    block is finished, so a run refused or failing before that leaves nothing behind."""

    def __init__(self, out, settings: dict, resume: bool, inputs=()):
        """Check before any work. `settings`: everything that determines the output (the run's config and
        the input checkpoint's fingerprint); `inputs`: the run's input paths. Raises UsageError when OUT.partial
        is (or holds) an input, for an interrupted run found without `resume`, of other settings (naming the
        first that differs), or damaged (an unreadable state, a finished shard or the next inputs missing)."""
        self.dir = partial_dir(out)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.state = None
        for inp in inputs:
            if inp is not None and (Path(inp).resolve() == self.dir or self.dir in Path(inp).resolve().parents):
                raise UsageError(f"--out {out}: a streamed prune keeps its progress in {self.dir}, which is the "
                                 f"input {inp}; choose another --out")
        if not self.dir.exists():
            if resume:
                log.info("--resume: %s does not exist; starting from block 0", self.dir)
            return
        if not resume:
            raise UsageError(f"{self.dir} holds an interrupted prune into {out}: pass --resume to continue it, "
                             "or delete that directory to start again")
        try:
            state = json.loads((self.dir / STATE).read_text())
            theirs, k, _ = dict(state["settings"]), int(state["block"]), list(state["rates"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{self.dir} has no readable {STATE}; delete it to start again") from None
        self.state = state
        for key in list(self.settings):  # in order: a changed --nsamples is named before the windows' hash
            self.check(key, self.settings[key])
        self._check_files(k)

    def check(self, key: str, mine) -> None:
        """UsageError when the interrupted run's setting `key` differs from `mine` (naming the innermost part
        that differs); records `mine` for a new run."""
        self.settings[key] = json.loads(json.dumps(mine, default=str))
        if self.state is None:
            return
        old, mine = self.state["settings"].get(key, _IMPLIED.get(key)), self.settings[key]
        if old != mine:
            while isinstance(old, dict) and isinstance(mine, dict):  # name the part that differs, in order
                part = next(p for p in [*mine, *old] if old.get(p) != mine.get(p))
                key, old, mine = f"{key}.{part}", old.get(part), mine.get(part)
            raise UsageError(f"--resume: {self.dir} was started with {key} = {_short(old)}, this run has "
                             f"{_short(mine)}; use the same settings and model, or delete it")

    def _check_files(self, k: int) -> None:
        """UsageError unless the first k blocks' shards are readable and block k's inputs are there."""
        from safetensors import safe_open

        for f in sorted(self.dir.glob("model-*.safetensors"))[:k] or []:
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception:
                raise UsageError(f"{f} is damaged; delete {self.dir} to start again") from None
        shards = {f.name for f in self.dir.glob("model-*.safetensors")}
        lost = [i for i in range(k) if not any(n.startswith(f"model-{i + 1:05d}-of-") for n in shards)]
        if lost:
            raise UsageError(f"{self.dir} lacks the shard of finished block {lost[0]}; delete it to start again")
        if k and not (self.dir / _inputs(k)).is_file():
            raise UsageError(f"{self.dir} lacks {_inputs(k)}, the inputs of block {k}; delete it to start again")

    @property
    def written(self) -> int:
        """Bytes of shards already written."""
        return sum(f.stat().st_size for f in self.dir.glob("*.safetensors")) if self.dir.exists() else 0

    def start(self, rates: list) -> dict | None:
        """`engine.prune_blocks`' `resume` argument, or None to start at block 0. The rates must be those
        the interrupted run used (UsageError otherwise)."""
        if self.state is None:
            self.state = {"settings": self.settings, "rates": rates, "block": 0, "results": []}
            return None
        if json.loads(json.dumps(rates)) != self.state["rates"]:
            raise UsageError(f"--resume: the layer-wise rates differ from those of the run in {self.dir}")
        k = self.state["block"]
        if k == 0:
            return None
        try:  # X is None after magnitude without the diagnostic, which runs no forwards
            saved = torch.load(self.dir / _inputs(k), map_location="cpu", weights_only=True)
            saved["X"]
        except Exception:
            raise UsageError(f"{self.dir / _inputs(k)} is damaged; delete {self.dir} to start again") from None
        log.info("resuming at block %d of a streamed prune (%s)", k, self.dir)
        return {"block": k, "X": saved["X"], "D": saved.get("D"), "results": self.state["results"]}

    def begin(self, model, rates: list, save_dtype) -> dict:
        """Start (or continue) streaming `model`'s pruned blocks into this directory: `pipeline.prune`'s
        keyword arguments (`on_block_end`, `resume`)."""
        from ..models.sharded import ShardWriter

        resume = self.start(rates)
        model.sparsellm_blocks.writer = ShardWriter(self.dir, model, save_dtype)
        return {"on_block_end": self.block_done, "resume": resume}

    def finish(self, model, tokenizer, prune_report: dict, dtype, device):
        """Write the rest of the model (last shard, index, config.json), the tokenizer and the sidecar, and
        return the pruned model as a lazy model read from these shards, on `device`."""
        from ..models.save import DECLARED_DTYPE
        from ..models.sharded import lazy_model
        from ..onload import attach
        from ..pipeline import sparsity_sidecar

        writer = model.sparsellm_blocks.writer
        writer.write_rest(model)
        writer.finish(model)
        tokenizer.save_pretrained(self.dir)
        generation = model.sparsellm_lazy.path / "generation_config.json"
        if generation.is_file():  # as save_pretrained writes it
            shutil.copy(generation, self.dir / generation.name)
        write_json_atomic(self.dir / "sparsity_config.json", sparsity_sidecar(model, prune_report))
        pruned = lazy_model(self.dir, dtype)
        setattr(pruned, DECLARED_DTYPE, getattr(model, DECLARED_DTYPE, None))
        attach(pruned, device)
        return pruned

    def block_done(self, i: int, X, D, result: dict) -> None:
        """After block i's shard is written: save block i + 1's inputs under their own name, then the state
        (both atomically), then drop block i's inputs. A kill at any point resumes at block i (its shard
        rewritten identically, from inputs-i) or at i + 1 (from inputs-(i + 1))."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = _inputs(i + 1)
        tmp = self.dir / f".{name}.tmp"
        torch.save({"X": None if X is None else X.cpu(), **({"D": D.cpu()} if D is not None else {})}, tmp)
        os.replace(tmp, self.dir / name)
        self.state["results"].append(json.loads(json.dumps(result, default=float)))
        self.state["block"] = i + 1
        write_json_atomic(self.dir / STATE, self.state)
        (self.dir / _inputs(i)).unlink(missing_ok=True)

    def model_writer(self):
        """A `RunDir.write` model writer: hard links of the finished model's files (not the progress files)."""

        def write(d: Path):
            for f in self.dir.iterdir():
                if f.name == STATE or f.name.startswith((".", "inputs-")):
                    continue
                try:
                    os.link(f, d / f.name)
                except OSError:
                    shutil.copy2(f, d / f.name)

        return write

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
