"""The output dir of a run: refuse to clobber a finished run, write files atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune.core.errors import UserError

# What a run writes into its output dir; `overwrite` removes exactly these.
RUN_ARTIFACTS = (
    "final",
    "checkpoints",
    "config.yaml",
    "metrics.jsonl",
    "eval_results.json",
    "logs",
    "curves.png",
    "generations",
)
FINISHED_MARKERS = ("final", "eval_results.json")


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool = False, fresh_if_unfinished=False) -> None:
    """A dir holding another run is refused unless `overwrite` or resuming it; call on every process
    before work starts. `fresh_if_unfinished` (resume_from=latest found no checkpoint) lets a run that
    died before its first checkpoint start over."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output.dir={output_dir} exists and is not a directory; choose another output.dir.")
    found = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if not found or overwrite or resuming:
        return
    finished = any(m in found for m in FINISHED_MARKERS)
    if fresh_if_unfinished and not finished:
        return
    state = "a finished run" if finished else "an unfinished run"
    resume = "" if finished else ", train.resume_from=latest to continue it from its last checkpoint,"
    raise UserError(
        f"output.dir={output_dir} already holds {state} ({', '.join(found)}). "
        f"Choose another output.dir{resume} or set output.overwrite=true to replace it."
    )


def is_finished(output_dir: Path) -> bool:
    """The run in `output_dir` saved its final model and results."""
    return all((output_dir / name).exists() for name in FINISHED_MARKERS)


def clear_previous_run(output_dir: Path) -> None:
    """Remove what an earlier run wrote (main process only, after `check_output_dir` allowed it)."""
    for name in RUN_ARTIFACTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished dir `tmp` to `target`, replacing an older `target` (kept until the rename is done)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
