"""Gradient accumulation that equals one large batch.

Dividing each micro-batch's mean loss by the number of accumulation steps k is only right when every
micro-batch holds the same number of loss terms (examples, or non-padding target tokens). With
padding, variable lengths, a short last window or several processes it is not. Instead each
micro-batch's *summed* loss is divided by N, the number of loss terms in the whole accumulation window
summed over its micro-batches and over all processes. The accumulated gradient is then exactly the
gradient of the mean loss over the window's examples, as one big batch would give.

Accelerate's `accumulate()` stays the mechanism (no gradient sync on non-final micro-steps). To know
N before the first backward of a window, `windows` reads the window's micro-batches ahead, counts their
loss terms and all-reduces the count: one small collective per optimizer step. `WindowBackward` runs a
window's forward and backward passes, and gets through an out-of-memory error by splitting micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device

from finetune.core.errors import UserError
from finetune.core.memory import is_out_of_memory, release_memory

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

    batches: list[dict]  # k micro-batches, or fewer for the last window of an epoch
    num_loss_terms: int  # loss terms in the window, summed over its micro-batches and all processes
    _scale: float = field(repr=False, default=0.0)

    @property
    def size(self) -> int:
        return len(self.batches)

    def normalise(self, summed_loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss to pass to `accelerator.backward`.

        Accelerate's backward divides by k (DeepSpeed's engine likewise) and data parallelism averages
        gradients over W processes, so the summed loss is scaled by k * W / N: the net gradient is
        d(sum of all the window's losses) / N.
        """
        return summed_loss * self._scale


def windows(
    accelerator: Accelerator, dataloader: Iterable[dict], count_loss_terms: Callable[[dict], torch.Tensor]
) -> Iterator[Window]:
    """The accumulation windows of a dataloader, each read ahead and its loss terms counted over all processes.

    Needs an Accelerator made with `GradientAccumulationPlugin(sync_with_dataloader=False)` (see
    `finetune.training.launch.make_accelerator`): reading ahead reaches the end of the dataloader before the last
    window's earlier micro-batches run, which would make `accumulate()` sync too early. Batches are moved to
    the accelerator's device (a prepared dataloader's already are).
    """
    if accelerator.gradient_state.sync_with_dataloader:
        raise RuntimeError(
            "accumulation windows need GradientAccumulationPlugin(sync_with_dataloader=False); "
            "build the Accelerator with finetune.training.launch.make_accelerator"
        )
    k = accelerator.gradient_accumulation_steps
    iterator = iter(dataloader)
    while batches := list(islice(iterator, k)):
        batches = [send_to_device(b, accelerator.device) for b in batches]
        local = torch.stack([count_loss_terms(b) for b in batches]).sum()
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local, reduction="sum")
        total = int(local.item())
        scale = k * accelerator.num_processes / total if total else 0.0
        yield Window(batches=batches, num_loss_terms=total, _scale=scale)


def accumulation_windows(
    accelerator: Accelerator, dataloader: Iterable[dict], count_loss_terms: Callable[[dict], torch.Tensor]
) -> Iterator[tuple[dict, Window]]:
    """(micro-batch, its window) pairs, for a loop over micro-batches inside `accelerator.accumulate()`:
    `accumulate()`'s counter is aligned at each window so that it syncs on the window's last batch."""
    for window in windows(accelerator, dataloader, count_loss_terms):
        align_accumulate(accelerator, window.size)
        for batch in window.batches:
            yield batch, window


def align_accumulate(accelerator: Accelerator, micro_batches: int) -> None:
    """Set `accumulate()`'s counter so that (counter % k == 0) falls on the last of `micro_batches`."""
    accelerator.step = -micro_batches % accelerator.gradient_accumulation_steps


def split_batch(batch: dict, pieces: int) -> list[dict]:
    """`batch` cut into `pieces` smaller batches along the example dimension (empty ones dropped)."""
    if pieces == 1:
        return [batch]
    parts = {name: torch.tensor_split(tensor, pieces) for name, tensor in batch.items()}
    return [{name: chunks[i] for name, chunks in parts.items()} for i in range(pieces) if len(parts["labels"][i])]


class WindowBackward:
    """Forward and backward over every micro-batch of a window, inside `accelerator.accumulate()`.

    If a micro-batch runs out of memory (one process), the window is redone from zeroed gradients with each
    micro-batch cut in two: twice the micro-batches of half the size, the same examples and normalisation,
    so the same gradient (accumulation is exact) and the same global batch. Later windows keep the smaller
    size. With several processes, recovering would need every process to change course at the same point
    of the gradient all-reduce, so the error stops the run with what to set instead.
    """

    def __init__(self, accelerator: Accelerator, loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor]):
        self.accelerator = accelerator
        self.loss_fn = loss_fn  # (model, batch) -> summed loss of the batch
        self.pieces = 1  # each micro-batch is cut into this many after out-of-memory errors
        self.notes: list[str] = []  # what the recovery did, for the run's log

    def __call__(self, model: torch.nn.Module, window: Window) -> torch.Tensor:
        """The window's summed loss on this process (detached); gradients accumulated in `model`."""
        while True:
            try:
                return self._run(model, window)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                del err  # its traceback holds the failed attempt's tensors
            self._shrink(model, window)

    def _run(self, model: torch.nn.Module, window: Window) -> torch.Tensor:
        micro_batches = [piece for batch in window.batches for piece in split_batch(batch, self.pieces)]
        align_accumulate(self.accelerator, len(micro_batches))
        total = torch.zeros((), device=self.accelerator.device)
        for batch in micro_batches:
            with self.accelerator.accumulate(model):
                summed_loss = self.loss_fn(model, batch)
                self.accelerator.backward(window.normalise(summed_loss))
            total += summed_loss.detach().float()
        return total

    def _shrink(self, model: torch.nn.Module, window: Window) -> None:
        size = max(len(b["labels"]) for b in window.batches)
        smallest = -(-size // self.pieces)  # the largest piece now
        alone = self.accelerator.num_processes == 1 and self.accelerator.distributed_type != DistributedType.DEEPSPEED
        if not alone or smallest == 1:
            why = "a single example" if smallest == 1 else "several processes, or DeepSpeed, cannot redo a window"
            raise UserError(
                f"out of memory in a micro-batch of {smallest} example(s) ({why}). Set train.micro_batch_size "
                f"below {smallest} (or auto), lower data.max_length, or turn on train.gradient_checkpointing."
            )
        model.zero_grad(set_to_none=True)  # the failed attempt may have accumulated part of its gradients
        release_memory()
        self.pieces *= 2
        self.notes.append(
            f"out of memory with micro-batches of {smallest}: this window and the next ones run micro-batches of "
            f"{-(-size // self.pieces)} with twice the accumulation (same global batch, same gradient)"
        )


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
