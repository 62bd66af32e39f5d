"""Device memory: what `micro_batch_size: auto` measures, and getting through an out-of-memory error.

A micro-batch fits when a whole optimizer step with it fits: weights, the optimizer's state (AdamW
allocates two fp32 copies of the trained weights at its first step), gradients held across the window's
micro-batches, the activations of one micro-batch, and an evaluation batch. `rehearse_step` runs exactly
that without changing any weight, and the rule keeps a margin below the device's limit for what a probe
cannot see (allocator fragmentation over a long run, longer evaluation outputs, communication buffers).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from accelerate.utils.memory import should_reduce_batch_size

# A candidate micro-batch fits when its rehearsal peaks at no more than this share of the device's limit.
HEADROOM = 0.85


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def release_memory() -> None:
    """Return freed blocks to the device so the next attempt starts from a clean slate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DeviceMemory:
    """High-water mark and limit of this process's memory on `device`.

    On CUDA: bytes reserved by the caching allocator (what fragmentation really costs), against the cap of
    `torch.cuda.set_per_process_memory_fraction` or what is free on the card. Elsewhere the limit is unknown
    (None): only an out-of-memory error says that a size does not fit.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None

    def limit(self) -> int | None:
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(self.device)
        return int(min(total * fraction, torch.cuda.memory_reserved(self.device) + free))


def materialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate the optimizer's state now instead of at its first step, changing no weight and no value.

    A step with learning rate 0 and zero gradients creates AdamW's moments as zeros and leaves every weight
    bitwise unchanged (weight decay multiplies by 1 - 0); the step counters are then reset, so the first
    real step is exactly the step a fresh optimizer would take.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper steps through its scaler
    params = [p for group in inner.param_groups for p in group["params"]]
    if all(p in inner.state for p in params):
        return
    lrs = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
    inner.step()
    for group, lr in zip(inner.param_groups, lrs, strict=True):
        group["lr"] = lr
    for p in params:
        p.grad = None
        step = inner.state.get(p, {}).get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            inner.state[p]["step"] = 0


def rehearse_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    batch: dict,
    micro_batches: int,
    eval_batch: dict | None = None,
) -> None:
    """The memory of one optimizer step with `batch` as its micro-batch, and of an evaluation batch,
    without changing the model: optimizer state allocated, two training-mode forward/backward passes when the window has
    several micro-batches (the second runs while the first one's gradients are held), then the gradients
    dropped (as `zero_grad` does before evaluation) and one forward of `eval_batch` without gradients.

    Call it on the unwrapped model: no gradient all-reduce, so each process can rehearse on its own.
    """
    was_training = model.training
    materialise_optimizer_state(optimizer)
    model.train()  # as in training: dropout and friends keep their masks for backward
    for _ in range(min(micro_batches, 2)):
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    if eval_batch is not None:
        model.eval()
        with torch.no_grad():
            loss_fn(model, eval_batch)  # evaluation computes what training does, without gradients
    model.train(was_training)
