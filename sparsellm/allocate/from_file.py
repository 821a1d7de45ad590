"""User-supplied layer-wise rates: `--allocation file:rates.json`, a JSON list with one rate per decoder
block, or a dict from block index (as a string or number) to rate covering every block."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import UsageError
from ..registry import register


@dataclass
class FileConfig:
    """A rates file (`--allocation file:PATH` sets `path`) and whether its mean may miss the target."""

    path: str = setting("", "the rates file (set by --allocation file:PATH)", flag="")
    allow_mean_mismatch: bool = setting(False, "accept a rates file whose mean is not --sparsity_ratio (the measured "
                                               "sparsity will differ)")

    def validate(self, target: float) -> "FileConfig":
        read_rates(self.path)  # the file's shape and keys, before the model is loaded
        return self


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def read_rates(path: str | Path, num_blocks: int | None = None) -> list[float]:
    """Rates from a JSON file. Raises UsageError for a missing or malformed file, keys that are not block
    indices (named in the message), and, given `num_blocks`, the wrong length or missing or extra block
    indices, or non-numeric values (the range and mean are checked by `check_rates`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"allocation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"cannot read allocation file {path}: {e.strerror}") from None
    blocks = "0..N-1" if num_blocks is None else f"0..{num_blocks - 1}"
    if isinstance(data, dict):
        unknown = [k for k in data if not (k.isdigit() and k == str(int(k)))]
        if unknown:
            raise UsageError(f"{path}: unknown keys {_names(unknown)}; the keys must be block indices {blocks}")
        by_index = {int(k): v for k, v in data.items()}
        if num_blocks is None:
            data = list(by_index.values())
        else:
            extra = sorted(set(by_index) - set(range(num_blocks)))
            missing = sorted(set(range(num_blocks)) - set(by_index))
            if extra or missing:
                raise UsageError(f"{path}: needs exactly the block indices {blocks}" +
                                 (f"; no such block: {_names(extra)}" if extra else "") +
                                 (f"; missing: {_names(missing)}" if missing else ""))
            data = [by_index[i] for i in range(num_blocks)]
    if not isinstance(data, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in data):
        raise UsageError(f"{path}: expected a list of numbers or a dict from block index to number")
    if num_blocks is not None and len(data) != num_blocks:
        raise UsageError(f"{path}: {len(data)} rates for {num_blocks} decoder blocks")
    return [float(r) for r in data]


@register("allocator", "file", FileConfig)
def rates_for_model(model, calib_ids, target: float, config: FileConfig, **_):
    """The file's rates for `model`'s decoder blocks, checked: each in [0, 1), mean the target within 1e-6
    unless `allow_mean_mismatch`."""
    from ..models import get_blocks
    from . import check_rates

    L = len(get_blocks(model))
    tol = float("inf") if config.allow_mean_mismatch else 1e-6
    return check_rates(read_rates(config.path, L), L, target, tol=tol), {}
