"""The loop's policy, written once for every recipe: `fit` trains a prepared model over its accumulation windows
and decides, after each optimizer step, what happens next (log, stop, checkpoint, evaluate, early stopping, save,
exit for a signal). `finetune.training.step` holds one optimizer step's guarantees."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.core.metric_names import MetricGoal
from finetune.core.modeling import write_model
from finetune.core.optim import build_scheduler, total_optimizer_steps
from finetune.core.precision import LostUpdateCheck
from finetune.core.run_dir import RunDir
from finetune.core.startup import startup
from finetune.training import levers
from finetune.training.checkpoints.resume import load_checkpoint, resume, resume_command
from finetune.training.checkpoints.writer import CheckpointWriter
from finetune.training.progress import Progress
from finetune.training.run import Run
from finetune.training.step import LossFn, StopSignals, TrainStep, training_windows
from finetune.training.tracking import memory_mb


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

    @property
    def goal(self) -> MetricGoal:
        return MetricGoal.of(self.metric, self.min_delta)

    def update(self, progress: Progress, metrics: dict | None) -> Verdict:
        """Count the evaluation `metrics` made at `progress.step` (None: no evaluation at this step)."""
        if not self.enabled or metrics is None:
            return Verdict()
        goal = self.goal
        value = goal.value(metrics)  # None when not finite: a NaN evaluation is no improvement
        new_best = goal.better(value, progress.best_value)
        if new_best:
            progress.best_value, progress.best_step = value, progress.step
        if goal.improves(value, progress.reference_value):
            progress.reference_value, progress.evals_without_improvement = value, 0
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
        best = RunDir(run_dir).best
        # `update` has counted the last evaluation: ties go to the earlier model, as for the best checkpoint.
        last_is_best = progress.best_step in (None, progress.step)
        if not self.enabled or last_is_best or not best.is_dir():
            return metrics, progress.step
        saved = load_checkpoint(accelerator, scheduler, best.resolve())
        return dict(saved.metrics or {}), saved.step


@dataclass
class Outcome:
    """What `fit` leaves: the model in memory (the last, or with early stopping the best evaluated) and its numbers."""

    metrics: dict  # the evaluation of the model in memory
    step: int  # the optimizer step that model is from
    progress: Progress  # where training stopped
    warnings: list[str]  # loud warnings raised during training (e.g. bf16 lost updates)
    stats: dict  # throughput and memory: eval_results.json reports them
    early_stopping: dict | None  # EarlyStopping.record, None when off


Evaluate = Callable[[int], dict]  # (the step evaluated at) -> metrics, without the eval_ prefix


@dataclass
class Task:
    """What a recipe supplies to `fit`, beside its model and data: the loss of a micro-batch (summed over its loss
    terms), the count of those terms (exact accumulation normalises by the window's count over all processes),
    and the evaluation."""

    loss: LossFn
    count_loss_terms: Callable[[dict], torch.Tensor]
    evaluate: Evaluate
    # More of the training interval to log beside the loss, called on every process at each log record (a
    # collective may run), e.g. DPO's rewards; None: nothing more.
    log_record: Callable[[], dict] | None = None


def fit(run: Run, model, optimizer, tokenizer, train_loader, task: Task, data_summary: str) -> Outcome:
    """Train `model` from where the run stands to its last optimizer step, with every guarantee of the loop.

    After each optimizer step, in this order: log (every `logging.every_n_steps`, and the last step); stop at the
    last step (the final evaluation follows); a periodic checkpoint due?; evaluate (every `eval.every_n_steps`,
    and before each periodic checkpoint); the early-stopping verdict; save (periodic, preempted, or a new best
    under early stopping); exit for a stop signal (after its checkpoint); stop early. Then the final evaluation,
    and with early stopping the best evaluated model back in memory.

    The recipe supplies what differs (`task`: the loss, its term count, the evaluation) and its prepared model and
    training loader; `data_summary` opens the run's summary line ("N train / M validation examples").
    """
    accelerator, cfg, log, geometry = run.accelerator, run.cfg, run.log, run.geometry
    total_steps = total_optimizer_steps(
        len(train_loader), geometry.accumulation_steps, cfg.train.epochs, cfg.train.max_steps
    )
    scheduler = accelerator.prepare(
        build_scheduler(optimizer, cfg.train.lr_scheduler, total_steps, cfg.train.warmup_steps)
    )
    log.info(
        f"{data_summary}; {geometry.describe()}; {total_steps} optimizer steps; "
        f"mixed precision {accelerator.mixed_precision}"
    )

    # ---- resume: weights, optimizer, scheduler, RNG; where in the data to continue
    progress = Progress(
        num_processes=accelerator.num_processes,
        micro_batch_size=geometry.micro_batch_size,
        accumulation_steps=geometry.accumulation_steps,
        batches_per_epoch=len(train_loader),
    )
    if run.resume_from is not None:
        progress = resume(accelerator, scheduler, run.resume_from, progress, cfg.train.resume_allow_changes)
        log.info(f"resumed from {run.resume_from}: step {progress.step}, {progress.epochs} epochs")

    def evaluated() -> dict:
        metrics = task.evaluate(progress.step)
        log.log(progress.step, {f"eval_{name}": value for name, value in metrics.items()})
        return metrics

    checkpoints = CheckpointWriter(accelerator, cfg.checkpoint.background_write)

    def save(metrics: dict | None, reason: str) -> Path:
        return checkpoints.save(
            scheduler,
            run.dir.root,
            replace(progress, metrics=metrics, reason=reason),
            cfg,
            lambda target: write_model(accelerator, model, tokenizer, target, cfg.data.max_length, merge_lora=False),
            cfg.checkpoint.keep_last,
            cfg.metric_for_best(),
            wait=reason == "preempted",  # the run exits next
        )

    # ---- train: one optimizer step per accumulation window
    startup.mark("data")  # tokenization, batches, schedule, resume
    memory_before = memory_mb(accelerator.device)["now"]
    lost_updates = LostUpdateCheck(model, cfg.train.lr) if cfg.train.weights_dtype == "bf16" else None
    early_stopping = EarlyStopping(
        cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta, cfg.metric_for_best()
    )
    warnings: list[str] = []
    metrics: dict | None = None
    log.start_progress(total_steps, done=progress.step)
    model.train()
    with StopSignals() as signals:
        train_step = TrainStep(
            accelerator,
            model,
            optimizer,
            scheduler,
            levers.training_loss(cfg.train, task.loss),
            signals,
            max_grad_norm=cfg.train.max_grad_norm,
            on_nonfinite=cfg.train.on_nonfinite_loss,
            lost_updates=lost_updates,
            info=log.info,
        )
        for window in training_windows(
            accelerator, train_loader, progress, total_steps, task.count_loss_terms, cfg.train.seed
        ):
            report = train_step(window, progress)
            warnings += report.warnings
            log.advance()
            if every(cfg.logging.every_n_steps, progress.step) or progress.step == total_steps:
                more = task.log_record() if task.log_record is not None else {}
                log.log(progress.step, {"epoch": progress.epochs, **train_step.log_record(), **more})
            if progress.step == total_steps:
                break  # the final evaluation and final/ end the run
            checkpoint_now = checkpoint_due(cfg.checkpoint, progress)
            with train_step.paused("evaluation"):  # not training time: eval_results.json reports it apart
                metrics = evaluated() if checkpoint_now or every(cfg.eval.every_n_steps, progress.step) else None
            verdict = early_stopping.update(progress, metrics)
            if checkpoint_now or report.stop or verdict.new_best:
                with train_step.paused("checkpoints"):
                    saved_to = save(metrics, "preempted" if report.stop else "periodic")
            if report.stop:
                log.close()
                stop_for_signal(accelerator, signals, progress, saved_to, run.argv, log.info)
            if verdict.stop:
                log.info(verdict.reason)
                break

    # ---- the final evaluation; with early stopping, the best evaluated model back in memory
    stats = {
        **train_step.throughput.summary(),
        "memory_mb": {**memory_mb(accelerator.device), "before_training": memory_before},
    }
    if not early_stopping.stopped:
        early_stopping.update(progress, metrics := evaluated())
    checkpoints.wait()  # the last checkpoint is on disk before any is read back or the run is reported
    metrics, final_step = early_stopping.restore_best(accelerator, scheduler, run.dir.root, progress, metrics)
    log.close()
    return Outcome(metrics, final_step, progress, warnings, stats, early_stopping.record(progress))
