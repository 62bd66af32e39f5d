"""The training loop's guarantees, written once for every recipe.

A recipe's loop reads:

    with StopSignals() as signals:
        train_step = TrainStep(accelerator, model, optimizer, scheduler, loss_fn, signals, ...)
        for window in training_windows(accelerator, train_loader, progress, total_steps, count_loss_terms, seed):
            report = train_step(window, progress)     # one optimizer step over the window
            ...log, evaluate, checkpoint on the recipe's cadence...
            if report.stop: stop_for_signal(...)

- `training_windows` yields accumulation windows across epochs, from where `progress` stands (a resumed run
  continues with the very next batch), reseeding every RNG per window from (seed, step) so the dropout
  masks depend on the step alone.
- `TrainStep` runs forward and backward over the window (exact accumulation, out-of-memory recovery), then
  agrees with every process on non-finite losses and stop requests (one small all-reduce), clips, steps
  or skips, advances the scheduler, and advances `progress`. It keeps the logging interval's loss,
  gradient norm and throughput, read back from the device only when a record is logged.
- `StopSignals` turns SIGTERM / Ctrl-C into "stop after this optimizer step" and always restores the
  previous handlers.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_compiled_module

from finetune.core.compile import compiled_graphs
from finetune.core.errors import UserError
from finetune.core.precision import LostUpdateCheck
from finetune.training.accumulation import LossMeter, Window, WindowBackward, windows
from finetune.training.progress import Progress, seed_window
from finetune.training.tracking import Throughput

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, micro-batch) -> summed loss of the batch
TORCH_CLIP = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # see TrainStep.__init__


class StopSignals:
    """SIGTERM and Ctrl-C (SIGINT) ask the run to stop after the current optimizer step.

    A context manager: the previous handlers are restored on leaving it, however it is left. `exchange`
    is called once per optimizer step on every process: one small all-reduce tells all of them whether
    any process saw a non-finite loss in the window or received a stop signal, so that they skip, stop or
    save together. A second Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def exchange(self, accelerator: Accelerator, window_finite: torch.Tensor) -> tuple[bool, bool]:
        """(any process saw a non-finite loss, any process was asked to stop): one device read per step."""
        if accelerator.num_processes == 1:
            return not bool(window_finite), self.signal is not None
        asked = torch.tensor(float(self.signal is not None), device=window_finite.device)
        flags = torch.stack([(~window_finite).to(torch.float32), asked])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        nonfinite, stop = (bool(x) for x in flags.cpu().tolist())
        if stop and self.signal is None:
            self.signal = signal.SIGTERM  # another process received it
        return nonfinite, stop

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


def training_windows(
    accelerator: Accelerator,
    dataloader,
    progress: Progress,
    total_steps: int,
    count_loss_terms: Callable[[dict], torch.Tensor],
    seed: int,
) -> Iterator[Window]:
    """The accumulation windows still to train on, epoch after epoch, until `progress.step == total_steps`.

    Starts where `progress` stands (skipping the batches of the epoch already trained on) and relies on
    `progress.advance` (called by `TrainStep`) between windows. Every RNG is seeded from (seed, step) just
    before a window is handed out, so the window's dropout masks are the same with or without an interruption.
    """
    while progress.step < total_steps:
        dataloader.set_epoch(progress.epoch)
        skip = progress.batches_into_epoch
        batches: Iterable[dict] = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch = progress.epoch
        for window in windows(accelerator, batches, count_loss_terms):
            seed_window(seed, progress.step)
            yield window
            if progress.step >= total_steps:
                return
        if progress.epoch == epoch:  # an empty epoch (nothing left to skip to): never loop forever
            raise RuntimeError(f"epoch {epoch} yielded no accumulation window; the dataloader is empty")


@dataclass
class StepReport:
    """What one optimizer step did."""

    skipped: bool  # the loss was not finite somewhere: no update (train.on_nonfinite_loss=skip)
    stop: bool  # a process was asked to stop (SIGTERM / Ctrl-C): save and exit after this step
    warnings: list[str] = field(default_factory=list)  # new loud warnings (e.g. bf16 lost updates)


class TrainStep:
    """One optimizer step over an accumulation window, with every guarantee the loop owes the user.

    Order within a step: forward/backward over the window's micro-batches (normalised by the window's
    global loss-term count, see `finetune.training.accumulation`), the finite/stop exchange, gradient clipping,
    the optimizer step (or a skip), the scheduler step, zeroed gradients, `progress.advance`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer,
        scheduler,
        loss_fn: LossFn,
        signals: StopSignals,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "stop",
        lost_updates: LostUpdateCheck | None = None,
        info: Callable[[str], None] = print,
    ):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.signals, self.on_nonfinite, self.lost_updates, self.info = signals, on_nonfinite, lost_updates, info
        self.max_grad_norm = max_grad_norm or math.inf
        self.backward = WindowBackward(accelerator, loss_fn)
        self.loss = LossMeter()
        self.throughput = Throughput()
        self.grad_norm: torch.Tensor | float | None = None
        # Accelerate's clip_grad_norm_ is torch's for one process or DDP without an fp16 grad scaler, after
        # per-step checks (unscaling, DTensor groups) that cost ~2% of a small model's step; FSDP, DeepSpeed, XLA
        # and fp16 take its path.
        torch_clip = accelerator.distributed_type in TORCH_CLIP and accelerator.scaler is None
        self.clip_grad_norm_ = torch.nn.utils.clip_grad_norm_ if torch_clip else accelerator.clip_grad_norm_
        self.compiled = is_compiled_module(model)  # train.compile: the log counts dynamo's graphs

    def __call__(self, window: Window, progress: Progress) -> StepReport:
        step = progress.step + 1
        summed_loss = self.backward(self.model, window)
        for note in self.backward.notes:
            self.info(f"step {step}: {note}")
        self.backward.notes.clear()
        self.loss.add(summed_loss, window)
        self.throughput.add(*window_counts(window, self.accelerator.num_processes))
        nonfinite, stop = self.signals.exchange(self.accelerator, torch.isfinite(summed_loss))
        if nonfinite and self.on_nonfinite == "stop":
            raise UserError(
                f"the training loss is not finite (NaN or inf) at optimizer step {step} (epoch {progress.epoch}). "
                "Lower train.lr, check the data, or set train.on_nonfinite_loss=skip."
            )
        self.grad_norm = self.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        report = StepReport(skipped=nonfinite, stop=stop)
        if nonfinite:
            self.info(f"step {step}: the loss is not finite; update skipped")
        elif self.lost_updates is None:
            self.optimizer.step()
        elif warning := self.lost_updates.step(self.optimizer):  # pure bf16: measured on the first step
            report.warnings.append(warning)
            self.info(f"WARNING: {warning}")
        self.scheduler.step()
        self.optimizer.zero_grad()
        progress.advance(window)
        return report

    def log_record(self) -> dict[str, float]:
        """The logging interval's mean loss, last lr and gradient norm, and throughput; starts a new interval."""
        rates = self.throughput.pop()
        return {
            "loss": self.loss.pop_mean(self.accelerator),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float("nan") if self.grad_norm is None else float(self.grad_norm),  # DeepSpeed: none yet
            **rates,
            **({"compiled_graphs": compiled_graphs()} if self.compiled else {}),
        }

    def paused(self, kind: str):
        """A block whose time is not training time: `kind` = evaluation, checkpoints."""
        return self.throughput.paused(kind)


def window_counts(window: Window, num_processes: int) -> tuple[int, torch.Tensor]:
    """(examples or packed rows, input tokens but padding) of the window over all processes: this process's
    count times their number, no collective. The token count stays on the device until it is logged."""
    examples = sum(len(batch["input_ids"]) for batch in window.batches) * num_processes
    tokens = [
        batch["attention_mask"].sum() if "attention_mask" in batch else torch.tensor(batch["input_ids"].numel())
        for batch in window.batches
    ]
    return examples, torch.stack([t.to(tokens[0].device) for t in tokens]).sum() * num_processes
