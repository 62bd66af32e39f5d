"""Checkpoints you can resume from exactly.

A checkpoint is `<run>/checkpoints/step_NNNNNN/`:

    state/          accelerator.save_state: optimizer, scheduler, grad scaler, every process's RNG
    model/          save_pretrained weights (safetensors) + tokenizer: what finetune-eval scores, and what a
                    resumed run loads its weights from. With LoRA, the adapter alone (the trainable weights).
    config.yaml     the resolved config of the run
    progress.json   step, epoch, batches into the epoch, samples seen, batch geometry, eval metrics

It is written into `.tmp-step_NNNNNN/` and renamed into place, progress.json last: a crash mid-save
leaves a `.tmp-*` dir that nothing mistakes for a checkpoint. `CheckpointWriter` can do the disk write in a
background thread, from a copy staged in shared memory, while training goes on. After each save the newest
`checkpoint.keep_last` checkpoints are kept plus the best by `eval.metric_for_best` (`checkpoints/best`
links to it).

The weights are written once. `keep_weights_once` registers Accelerate save/load hooks: `save_state` leaves
the model out of state/ and `load_state` reads it from model/ instead (bitwise the same tensors). A LoRA
checkpoint holds only the trainable weights and their optimizer state: the frozen base is the model the run
started from, and state/base_model.json keeps a hash of its frozen weights, compared on resume. Under
DeepSpeed and FSDP the engine's sharded state/ keeps its own copy of the weights (model/ is the gathered one).

Exact resume needs the same data in the same order and the same dropout masks. The shuffle order is
a function of (seed, epoch) alone (Accelerate's seedable sampler, or `LengthGroupedSampler`), so a
resumed run skips the epoch's first batches. Dropout draws from the global torch RNG, which other
code also draws from (creating a DataLoader iterator takes a base seed from it), so the training
loop reseeds it at the start of every accumulation window from (seed, step): the masks then depend
on nothing but the step, with or without an interruption.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

from finetune.core.metric_names import MetricGoal
from finetune.core.run_dir import RunDir
from finetune.training.progress import Progress

CHECKPOINTS_DIR = RunDir.CHECKPOINTS
STATE_DIR = "state"
MODEL_DIR = "model"
PROGRESS_FILE = "progress.json"
# Accelerate's save_state skips an LR scheduler prepared on its own under DeepSpeed (it wraps it for the
# engine but never hands it over, so neither saves it): its state then goes here, as JSON.
SCHEDULER_FILE = "scheduler.json"
BEST_LINK = RunDir.BEST
BASE_MODEL_FILE = "base_model.json"  # in state/: the hash of a LoRA run's frozen base weights


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    progress_file = path / PROGRESS_FILE
    if not progress_file.is_file():
        return f"no {PROGRESS_FILE} (the save did not finish)"
    try:
        progress = read_progress(path)
    except (ValueError, TypeError) as err:
        return f"unreadable {PROGRESS_FILE} ({err})"
    missing = [f"{STATE_DIR}/random_states_{i}.pkl" for i in range(progress.num_processes)]
    missing = [name for name in missing if not (path / name).is_file()]
    if not (path / MODEL_DIR / "config.json").is_file():
        missing.append(f"{MODEL_DIR}/config.json")
    if not (path / RunDir.CONFIG).is_file():
        missing.append(RunDir.CONFIG)
    return f"missing {', '.join(missing)}" if missing else None


def read_progress(path: Path) -> Progress:
    raw = json.loads((path / PROGRESS_FILE).read_text())
    known = {f.name for f in fields(Progress)}
    return Progress(**{k: v for k, v in raw.items() if k in known})


def list_checkpoints(run_dir: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped with a warning."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = RunDir.checkpoint_step(path)
        if step is None or not path.is_dir() or path.is_symlink():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((step, path))
        elif warn:
            warnings.warn(f"ignoring checkpoint {path}: {problem}", stacklevel=2)
    return [path for _, path in sorted(found)]


def best_checkpoint(checkpoints: list[Path], metric: str) -> Path | None:
    """The checkpoint with the best evaluated `metric` (`MetricGoal`: ties to the earlier one, as Trainer's
    best-model tracking; not evaluated or not finite: never best), or None."""
    goal = MetricGoal.of(metric)
    return goal.best(checkpoints, lambda path: goal.value(read_progress(path).metrics))


def prune(run_dir: Path, keep_last: int, metric: str) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best; (re)point `checkpoints/best`."""
    root = run_dir / CHECKPOINTS_DIR
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".tmp-delete-*")]:  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
    checkpoints = list_checkpoints(run_dir, warn=False)
    best = best_checkpoint(checkpoints, metric)
    keep = set(checkpoints[-keep_last:]) | ({best} if best else set())
    for path in checkpoints:
        if path not in keep:
            doomed = path.with_name(f".tmp-delete-{path.name}")  # never a half-deleted dir that looks complete
            path.rename(doomed)
            shutil.rmtree(doomed)
    link = root / BEST_LINK
    if best is None:
        link.unlink(missing_ok=True)
        return
    tmp_link = link.with_name(f".tmp-{BEST_LINK}")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(best.name, target_is_directory=True)
    tmp_link.replace(link)  # atomic: `best` always names a complete checkpoint
