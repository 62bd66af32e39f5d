"""The loop's policy after each optimizer step: cadences, early stopping, stopping for a signal."""

from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from finetune.core.metric_names import LOWER_IS_BETTER
from finetune.training.checkpoints.layout import BEST_LINK, CHECKPOINTS_DIR
from finetune.training.checkpoints.resume import load_checkpoint, resume_command
from finetune.training.progress import Progress
from finetune.training.step import StopSignals


def every(n: int | None, step: int) -> bool:
    """Whether a cadence of every `n` steps (None = never) falls on `step`."""
    return bool(n) and step % n == 0


def checkpoint_due(checkpoint, progress: Progress) -> bool:
    """A periodic checkpoint after this step (`checkpoint` is a CheckpointConfig): every N steps, or at an
    epoch's end."""
    return every(checkpoint.every_n_steps, progress.step) or (checkpoint.at_epoch_end and progress.epoch_ended)


def stop_for_signal(
    accelerator: Accelerator, signals: StopSignals, progress: Progress, checkpoint, argv: list[str], info
) -> None:
    """End a run that was asked to stop, after its checkpoint: say how to resume, exit 128 + signal."""
    command = resume_command(sys.argv[0], argv, accelerator.num_processes)
    info(f"stopped by {signals.name} after step {progress.step}: checkpoint {checkpoint}. {command}")
    accelerator.end_training()
    sys.exit(128 + (signals.signal or signal.SIGTERM))


@dataclass
class Verdict:
    """What an evaluation means for early stopping."""

    new_best: bool = False  # the best value of the metric so far: checkpoint it, final/ may be this model
    stop: bool = False
    reason: str = ""


@dataclass
class EarlyStopping:
    """train.early_stopping_patience: stop after `patience` evaluations in a row that did not improve `metric`
    by more than `min_delta` on the last value that did. Its state lives in `Progress`: a resumed run counts on.

    Every evaluation with the best value so far is checkpointed (`Verdict.new_best`), so the best model can
    end up in final/ whatever `checkpoint.keep_last` prunes (the best checkpoint is always kept)."""

    patience: int | None
    min_delta: float
    metric: str
    stopped: bool = False

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    def better(self, value: float, than: float | None, by: float = 0.0) -> bool:
        if than is None:
            return True
        return (than - value if self.metric in LOWER_IS_BETTER else value - than) > by

    def update(self, progress: Progress, metrics: dict | None) -> Verdict:
        """Count the evaluation `metrics` made at `progress.step` (None: no evaluation at this step)."""
        if not self.enabled or metrics is None:
            return Verdict()
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            value = None  # a NaN evaluation is no improvement
        new_best = value is not None and self.better(value, progress.best_value)
        if new_best:
            progress.best_value, progress.best_step = float(value), progress.step
        if value is not None and self.better(value, progress.reference_value, self.min_delta):
            progress.reference_value, progress.evals_without_improvement = float(value), 0
        else:
            progress.evals_without_improvement += 1
        self.stopped = progress.evals_without_improvement >= self.patience
        reason = (
            f"early stopping after step {progress.step}: eval {self.metric} did not improve by more than "
            f"{self.min_delta:g} in {self.patience} evaluation(s); the best, {progress.best_value:.6g}, was at "
            f"step {progress.best_step}"
            if self.stopped
            else ""
        )
        return Verdict(new_best=new_best, stop=self.stopped, reason=reason)

    def record(self, progress: Progress) -> dict | None:
        """What eval_results.json says about early stopping (None when it was off)."""
        if not self.enabled:
            return None
        return {
            "stopped_early": self.stopped,
            "step": progress.step,
            "best_step": progress.best_step,
            "metric": self.metric,
            "best_value": progress.best_value,
            "patience": self.patience,
            "min_delta": self.min_delta,
        }

    def restore_best(self, accelerator: Accelerator, scheduler, run_dir: Path, progress: Progress, metrics: dict):
        """Load the best checkpoint into the prepared model unless the last evaluation (`metrics`, counted by
        `update`) was the best (every process); return the metrics of the model now in memory and its step."""
        best = run_dir / CHECKPOINTS_DIR / BEST_LINK
        # `update` has counted the last evaluation: ties go to the earlier model, as for the best checkpoint.
        last_is_best = progress.best_step in (None, progress.step)
        if not self.enabled or last_is_best or not best.is_dir():
            return metrics, progress.step
        saved = load_checkpoint(accelerator, scheduler, best.resolve())
        return dict(saved.metrics or {}), saved.step
