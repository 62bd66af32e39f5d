"""Gradient accumulation that equals one large batch.

Dividing each micro-batch's mean loss by the number of accumulation steps k is only right when every
micro-batch holds the same number of loss terms (examples, or non-padding target tokens). With
padding, variable lengths, a short last window or several processes it is not. Instead each
micro-batch's *summed* loss is divided by N, the number of loss terms in the whole accumulation window
summed over its micro-batches and over all processes. The accumulated gradient is then exactly the
gradient of the mean loss over the window's examples, as one big batch would give.

Accelerate's `accumulate()` stays the mechanism (no gradient sync on non-final micro-steps). To know
N before the first backward of a window, `accumulation_windows` reads the window's micro-batches
ahead, counts their loss terms and all-reduces the count: one small collective per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from accelerate import Accelerator

IGNORE_INDEX = -100  # label value that contributes no loss term (padding, prompt tokens)


def count_label_terms(batch: dict) -> torch.Tensor:
    """Loss terms of a classification or regression batch: one per example whose label is not ignored."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def count_next_token_terms(batch: dict) -> torch.Tensor:
    """Loss terms of a causal-LM batch: target tokens after the shift, ignoring -100 labels."""
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are summed in fp32 even under bf16/fp16 autocast (and in fp64 when the model is)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def summed_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of per-example losses: cross-entropy, or squared error for a 1-output regression head."""
    if logits.shape[-1] == 1 and labels.is_floating_point():
        logits = _at_least_fp32(logits.squeeze(-1))
        return F.mse_loss(logits, labels.to(logits.dtype), reduction="sum")
    return F.cross_entropy(_at_least_fp32(logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def summed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy of a causal LM, predicting token t+1 from tokens <= t."""
    shifted_logits = _at_least_fp32(logits[..., :-1, :])
    shifted_labels = labels[..., 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class Window:
    """One accumulation window: the micro-batches of one optimizer step on this process."""

    size: int  # micro-batches in this window (k, or fewer for the last window of an epoch)
    num_loss_terms: int  # loss terms in the window, summed over its micro-batches and all processes
    _scale: float = field(repr=False, default=0.0)

    def normalise(self, summed_loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss to pass to `accelerator.backward`.

        Accelerate's backward divides by k (DeepSpeed's engine likewise) and data parallelism averages
        gradients over W processes, so the summed loss is scaled by k * W / N: the net gradient is
        d(sum of all the window's losses) / N.
        """
        return summed_loss * self._scale


def accumulation_windows(
    accelerator: Accelerator,
    dataloader: Iterable[dict],
    count_loss_terms: Callable[[dict], torch.Tensor],
    on_window: Callable[[Window], None] | None = None,
) -> Iterator[tuple[dict, Window]]:
    """Yield (micro-batch, its window) over a prepared dataloader, one window read ahead at a time.

    `on_window(window)` runs after a window is read and before its first micro-batch is yielded.

    Needs an Accelerator made with `GradientAccumulationPlugin(sync_with_dataloader=False)` (see
    `finetune.launch.make_accelerator`): reading ahead reaches the end of the dataloader before the
    last window's earlier micro-batches run, which would make `accumulate()` sync too early. For a
    short last window its micro-step counter is advanced so that it syncs on the window's last batch.
    """
    if accelerator.gradient_state.sync_with_dataloader:
        raise RuntimeError(
            "accumulation_windows needs GradientAccumulationPlugin(sync_with_dataloader=False); "
            "build the Accelerator with finetune.launch.make_accelerator"
        )
    k = accelerator.gradient_accumulation_steps
    iterator = iter(dataloader)
    while batches := list(islice(iterator, k)):
        local = torch.stack([count_loss_terms(b) for b in batches]).sum()
        total = int(accelerator.reduce(local.to(accelerator.device), reduction="sum").item())
        scale = k * accelerator.num_processes / total if total else 0.0
        window = Window(size=len(batches), num_loss_terms=total, _scale=scale)
        # Align accumulate()'s counter so that (counter % k == 0) falls on this window's last batch.
        accelerator.step = k - len(batches)
        if on_window is not None:
            on_window(window)
        for batch in batches:
            yield batch, window


class LossMeter:
    """Mean training loss over a logging interval: sum of per-term losses / number of terms, all processes."""

    def __init__(self) -> None:
        self._local_sum: torch.Tensor | None = None
        self._terms = 0
        self._last_window: Window | None = None

    def add(self, summed_loss: torch.Tensor, window: Window) -> None:
        """Record a micro-batch's summed loss (this process) and, once per window, its global term count."""
        value = summed_loss.detach().float()
        self._local_sum = value if self._local_sum is None else self._local_sum + value
        if window is not self._last_window:
            self._terms += window.num_loss_terms
            self._last_window = window

    def pop_mean(self, accelerator: Accelerator) -> float:
        """The interval's true mean loss (one all-reduce), and start a new interval."""
        if self._local_sum is None or not self._terms:
            return float("nan")
        total = accelerator.reduce(self._local_sum.to(accelerator.device), reduction="sum")
        mean = float(total.item()) / self._terms
        self._local_sum, self._terms = None, 0
        return mean
