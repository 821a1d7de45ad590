"""User-supplied layer-wise rates: `--allocation file:rates.json`, a JSON list with one rate per decoder
block, or a dict from block index (as a string or number) to rate covering every block."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def read_rates(path: str | Path, num_blocks: int) -> list[float]:
    """Rates from a JSON file. Raises UsageError for a missing or malformed file, the wrong length, missing
    or extra block indices, or non-numeric values (the range and mean are checked by `check_rates`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"allocation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        try:
            by_index = {int(k): v for k, v in data.items()}
        except ValueError:
            raise UsageError(f"{path}: keys must be block indices 0..{num_blocks - 1}") from None
        if sorted(by_index) != list(range(num_blocks)):
            raise UsageError(f"{path}: needs exactly the block indices 0..{num_blocks - 1}")
        data = [by_index[i] for i in range(num_blocks)]
    if not isinstance(data, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in data):
        raise UsageError(f"{path}: expected a list of numbers or a dict from block index to number")
    if len(data) != num_blocks:
        raise UsageError(f"{path}: {len(data)} rates for {num_blocks} decoder blocks")
    return [float(r) for r in data]
