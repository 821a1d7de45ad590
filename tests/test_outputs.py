"""Output-directory checks and atomic writes (sparsellm/outputs.py)."""

from __future__ import annotations

import pytest

from sparsellm.errors import UsageError
from sparsellm.outputs import check_output_dir


def test_check_output_dir(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    ok = check_output_dir(tmp_path / "new", False, [model_dir])
    assert ok == (tmp_path / "new").resolve() and not ok.exists()
    for bad in (model_dir, model_dir / "sub", tmp_path):
        with pytest.raises(UsageError):
            check_output_dir(bad, True, [model_dir])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(UsageError):
        check_output_dir(busy, False, [model_dir])
    assert check_output_dir(busy, True, [model_dir]) == busy.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, False, [None]) == empty.resolve()
    with pytest.raises(UsageError):
        check_output_dir(tmp_path / "m" / "config.json", True, [])  # a file
