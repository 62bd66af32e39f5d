"""Where a run stands after an optimizer step, and the per-window seeding that makes resume exact."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed


@dataclass
class Progress:
    """Where training stands after an optimizer step: enough to continue with the very next batch.

    The one position record of a run: `advance` moves it over a window, rolling into the next epoch
    when the window used up the epoch's micro-batches."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batches_into_epoch: int = 0  # micro-batches of `epoch` already trained on, per process
    samples_seen: int = 0  # loss terms (examples, or target tokens) trained on, over all processes
    num_processes: int = 1
    micro_batch_size: int = 0
    accumulation_steps: int = 1
    batches_per_epoch: int = 0  # micro-batches per epoch per process
    metrics: dict | None = None  # eval metrics at `step`, if evaluated
    reason: str = "periodic"  # periodic | preempted
    # Early stopping (finetune.training.loop.EarlyStopping): kept here so that a resumed run counts on.
    best_value: float | None = None  # the best eval.metric_for_best so far
    best_step: int | None = None
    reference_value: float | None = None  # the last value that improved by more than the minimum delta
    evals_without_improvement: int = 0

    def advance(self, window) -> None:
        """One optimizer step over `window` (a `finetune.training.accumulation.Window`) was taken."""
        self.step += 1
        self.samples_seen += window.num_loss_terms
        self.batches_into_epoch += window.size
        if self.batches_into_epoch >= self.batches_per_epoch:
            self.epoch, self.batches_into_epoch = self.epoch + 1, 0

    @property
    def epoch_ended(self) -> bool:
        """The last step ended an epoch."""
        return self.step > 0 and self.batches_into_epoch == 0

    @property
    def epochs(self) -> float:
        """Epochs trained, with the fraction of the current one (what eval_results.json reports)."""
        fraction = self.batches_into_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0
        return round(self.epoch + fraction, 4)


def seed_window(seed: int, step: int) -> None:
    """Seed every RNG from (seed, step): the dropout masks of the window after `step` depend on nothing else.

    On CPU and CUDA it sets the very generator states `set_seed` sets (Python, NumPy, torch's CPU generator, every
    CUDA device's) without `torch.manual_seed`'s lazy seeding of devices that are not there (XPU and MTIA, and
    CUDA on a machine without one), which formats the call stack each time: ~6% of a small model's CPU step."""
    value = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    device_rng = _device_rng()
    if device_rng == "other":  # XPU, MPS, NPU, XLA, ...: Accelerate knows how to seed them
        set_seed(value)
        return
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)
    if device_rng == "cuda":
        torch.cuda.manual_seed_all(value)


@functools.cache
def _device_rng() -> str:
    """Which device's RNG `seed_window` seeds besides the host's: none, cuda, or other (left to `set_seed`)."""
    from accelerate.utils import is_torch_xla_available

    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else "unknown"
    if current is None and not is_torch_xla_available():
        return "none"
    return "cuda" if getattr(current, "type", None) == "cuda" else "other"
