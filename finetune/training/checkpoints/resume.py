"""Resuming: which checkpoint, whether it is the same run, loading it back."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from finetune.core.config import flatten, read_yaml
from finetune.core.errors import UserError, first_line
from finetune.core.run_dir import RunDir
from finetune.training.checkpoints.layout import (
    CHECKPOINTS_DIR,
    PROGRESS_FILE,
    SCHEDULER_FILE,
    STATE_DIR,
    checkpoint_problem,
    list_checkpoints,
    read_progress,
)
from finetune.training.progress import Progress

# Keys whose change makes a resumed run a different run than the one checkpointed.
RUN_DEFINING_KEYS = (
    "model.",
    "data.",
    "lora.",
    "train.epochs",
    "train.max_steps",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
    "train.global_batch_size",
    "train.optimizer",
    "train.lr",
    "train.weight_decay",
    "train.lr_scheduler",
    "train.warmup_steps",
    "train.max_grad_norm",
    "train.mixed_precision",
    "train.weights_dtype",
    "train.seed",
)


def resolve_resume(resume_from: str | None, run_dir: Path) -> Path | None:
    """The checkpoint dir `train.resume_from` names; None = start fresh (also `latest` with none saved yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        complete = list_checkpoints(run_dir)
        return complete[-1] if complete else None
    path = Path(resume_from)
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / PROGRESS_FILE).exists():  # a run dir: its newest
        complete = list_checkpoints(path)
        if not complete:
            raise UserError(f"train.resume_from={resume_from}: this run dir holds no complete checkpoint.")
        return complete[-1]
    if not path.is_dir():
        raise UserError(f"train.resume_from={resume_from}: no such checkpoint dir; give latest or a step_N dir.")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"train.resume_from={resume_from} is not a complete checkpoint: {problem}.")
    return path


def config_changes(checkpoint: Path, current: dict) -> list[str]:
    """Run-defining keys whose value differs between the checkpoint's config and `current` (a config dict)."""
    saved = dict(flatten(read_yaml(checkpoint / RunDir.CONFIG)))
    now = dict(flatten(current))
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RUN_DEFINING_KEYS) and saved.get(key) != now.get(key):
            changed.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changed


def geometry_changes(saved: Progress, now: Progress) -> list[str]:
    """Batch geometry (processes, micro-batch, accumulation) that differs between two launches."""
    pairs = {
        "processes": (saved.num_processes, now.num_processes),
        "micro-batch size": (saved.micro_batch_size, now.micro_batch_size),
        "accumulation steps": (saved.accumulation_steps, now.accumulation_steps),
    }
    return [f"{name}: {old} -> {new}" for name, (old, new) in pairs.items() if old != new]


def refuse_changes(changes: list[str], checkpoint: Path) -> None:
    if changes:
        raise UserError(
            f"resuming from {checkpoint} with a different run: "
            + "; ".join(changes)
            + ". Resume with the checkpoint's settings, start a new run in another output.dir, "
            "or set train.resume_allow_changes=true to resume anyway."
        )


def load_checkpoint(accelerator: Accelerator, scheduler, checkpoint: Path) -> Progress:
    """Restore model, optimizer, scheduler, scaler and RNG states (every process); return where training stood."""
    try:
        accelerator.load_state(str(checkpoint / STATE_DIR))
        if (checkpoint / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(json.loads((checkpoint / SCHEDULER_FILE).read_text()))
    except UserError:
        raise
    except Exception as err:  # torch, safetensors and Accelerate raise many types for a damaged file
        raise UserError(
            f"could not load checkpoint {checkpoint}: {first_line(err)}. "
            "Resume from another one: train.resume_from=<run>/checkpoints/step_N."
        ) from None
    return read_progress(checkpoint)


def resume(accelerator: Accelerator, scheduler, checkpoint: Path, now: Progress, allow_changes: bool) -> Progress:
    """Load `checkpoint` into the prepared objects; `now` (this launch's geometry) continued from its position."""
    saved = load_checkpoint(accelerator, scheduler, checkpoint)
    if not allow_changes:
        refuse_changes(geometry_changes(saved, now), checkpoint)
    return replace(
        now,
        step=saved.step,
        epoch=saved.epoch,
        batches_into_epoch=saved.batches_into_epoch,
        samples_seen=saved.samples_seen,
        best_value=saved.best_value,
        best_step=saved.best_step,
        reference_value=saved.reference_value,
        evals_without_improvement=saved.evals_without_improvement,
    )


def resume_command(script: str, argv: list[str], num_processes: int) -> str:
    """What to run to continue: the same command with train.resume_from=latest."""
    args = [a for a in argv if not a.startswith("train.resume_from=")]
    command = shlex.join(["accelerate", "launch", script, *args, "train.resume_from=latest"])
    launcher = " (with the same launcher options)" if num_processes > 1 else ""
    return f"Resume with{launcher}:\n  {command}"


def trim_metrics_log(path: Path, step: int) -> None:
    """Drop log records after `step` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
