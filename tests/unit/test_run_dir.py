"""finetune.core.run_dir: which output dirs a run may write to, clearing a previous run's files (only those), and
swapping a finished dir in atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.core.errors import UserError
from finetune.core.run_dir import check_output_dir, clear_previous_run, replace_dir, write_json


def test_output_dir_checks(tmp_path: Path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("{}")
    with pytest.raises(UserError, match="already holds an unfinished run \\(metrics.jsonl\\)"):
        check_output_dir(tmp_path / "half", overwrite=False)
    check_output_dir(tmp_path / "half", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_clear_previous_run_removes_only_run_files(tmp_path: Path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("x")
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "mine.txt").write_text("keep")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_replace_dir_swaps_in_a_finished_dir(tmp_path: Path):
    target = tmp_path / "final"
    first = tmp_path / ".tmp-final"
    first.mkdir()
    (first / "a.txt").write_text("first")
    replace_dir(first, target)
    assert (target / "a.txt").read_text() == "first"
    second = tmp_path / ".tmp-final"
    second.mkdir()
    (second / "b.txt").write_text("second")
    replace_dir(second, target)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary leftovers
    write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'
