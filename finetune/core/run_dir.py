"""The output dir of a run: refuse to clobber a finished run, write files atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from finetune.core.errors import UserError


class RunDir:
    """Every path of a run's output dir (`output.dir`), named once. A checkpoint's own inside is
    `finetune.training.checkpoints.layout`'s business."""

    CONFIG = "config.yaml"  # the resolved config (also inside every checkpoint)
    METRICS = "metrics.jsonl"  # one JSON record per log step and evaluation
    EVAL_RESULTS = "eval_results.json"  # the final evaluation: a finished run's marker, with final/
    FINAL = "final"  # the model to use: save_pretrained weights, tokenizer, model card
    CHECKPOINTS = "checkpoints"  # step_NNNNNN/ dirs, and `best` linking to one
    BEST = "best"
    LOGS = "logs"  # TensorBoard event files (and other local trackers' files)
    CURVES = "curves.png"
    GENERATIONS = "generations"  # SFT: greedy answers to validation prompts at each evaluation
    # What a run writes, and so what output.overwrite removes.
    ARTIFACTS = (FINAL, CHECKPOINTS, CONFIG, METRICS, EVAL_RESULTS, LOGS, CURVES, GENERATIONS)
    FINISHED_MARKERS = (FINAL, EVAL_RESULTS)

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    config = property(lambda self: self.root / self.CONFIG)
    metrics = property(lambda self: self.root / self.METRICS)
    eval_results = property(lambda self: self.root / self.EVAL_RESULTS)
    final = property(lambda self: self.root / self.FINAL)
    checkpoints = property(lambda self: self.root / self.CHECKPOINTS)
    best = property(lambda self: self.root / self.CHECKPOINTS / self.BEST)
    logs = property(lambda self: self.root / self.LOGS)
    curves = property(lambda self: self.root / self.CURVES)
    generations = property(lambda self: self.root / self.GENERATIONS)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """The step a checkpoint dir's name says (step_000120 -> 120), or None for any other name."""
        match = re.fullmatch(r"step_(\d+)", path.name)
        return int(match.group(1)) if match else None

    def generations_at(self, step: int) -> Path:
        return self.generations / f"step_{step:06d}.jsonl"


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool = False, fresh_if_unfinished=False) -> None:
    """A dir holding another run is refused unless `overwrite` or resuming it; call on every process
    before work starts. `fresh_if_unfinished` (resume_from=latest found no checkpoint) lets a run that
    died before its first checkpoint start over."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output.dir={output_dir} exists and is not a directory; choose another output.dir.")
    found = [name for name in RunDir.ARTIFACTS if (output_dir / name).exists()]
    if not found or overwrite or resuming:
        return
    finished = any(m in found for m in RunDir.FINISHED_MARKERS)
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
    return all((output_dir / name).exists() for name in RunDir.FINISHED_MARKERS)


def clear_previous_run(output_dir: Path) -> None:
    """Remove what an earlier run wrote (main process only, after `check_output_dir` allowed it)."""
    for name in RunDir.ARTIFACTS:
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
