"""Batch geometry: global batch = micro-batch x accumulation steps x processes.

A config states either the micro-batch and the accumulation steps, or the global batch (then the
accumulation steps follow). `micro_batch_size: auto` probes the largest micro-batch that fits in memory
with Accelerate's `find_executable_batch_size` and raises the accumulation steps to keep the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import find_executable_batch_size

from finetune.errors import UserError


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch_size: int  # examples per process per forward/backward
    accumulation_steps: int  # micro-batches per optimizer step
    processes: int  # data-parallel processes

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.processes

    def describe(self) -> str:
        return (
            f"effective batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x accumulation "
            f"{self.accumulation_steps} x {self.processes} process(es)"
        )


def plan_batches(train, processes: int) -> BatchGeometry | None:
    """The geometry a TrainConfig asks for on `processes` processes; None when the micro-batch is `auto`."""
    micro, accumulation, global_batch = (
        train.micro_batch_size,
        train.gradient_accumulation_steps,
        train.global_batch_size,
    )
    if micro == "auto":
        return None
    if global_batch is None:
        return BatchGeometry(micro, accumulation, processes)
    if global_batch % (micro * processes):
        raise UserError(
            f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size={micro} x "
            f"{processes} process(es) = {micro * processes}; change one of them so that it divides."
        )
    derived = global_batch // (micro * processes)
    if accumulation not in (1, derived):
        raise UserError(
            f"train.gradient_accumulation_steps={accumulation} contradicts train.global_batch_size={global_batch} "
            f"(which needs {derived} with micro-batch {micro} on {processes} process(es)); set only one of them."
        )
    return BatchGeometry(micro, derived, processes)


def find_micro_batch_size(
    accelerator: Accelerator,
    global_batch_size: int,
    try_micro_batch: Callable[[int], None],
) -> BatchGeometry:
    """The largest micro-batch for which `try_micro_batch(size)` (a forward and backward of the longest
    examples) does not run out of memory, agreed by all processes; accumulation keeps the global batch.

    Candidates are the divisors of the per-process global batch, largest first; Accelerate's
    `find_executable_batch_size` moves to the next one on an out-of-memory error.
    """
    processes = accelerator.num_processes
    if global_batch_size % processes:
        raise UserError(f"train.global_batch_size={global_batch_size} is not divisible by the {processes} processes.")
    per_process = global_batch_size // processes
    candidates = [d for d in range(per_process, 0, -1) if per_process % d == 0]
    tried: list[int] = []

    def next_candidate() -> int:
        smaller = [d for d in candidates if d < tried[-1]]
        return smaller[0] if smaller else 0  # 0 makes Accelerate give up

    @find_executable_batch_size(starting_batch_size=per_process, reduce_batch_size_fn=next_candidate)
    def probe(batch_size: int) -> int:
        tried.append(batch_size)
        try_micro_batch(batch_size)
        return batch_size

    try:
        fits = probe()
    except RuntimeError as err:
        if "No executable batch size found" not in str(err):
            raise
        raise UserError(
            f"train.micro_batch_size=auto: even a micro-batch of {tried[-1]} ran out of memory "
            f"(tried {', '.join(map(str, tried))}). Lower data.max_length, turn on train.gradient_checkpointing "
            "or lora.enabled, or launch with accelerate_configs/deepspeed_zero3_offload.yaml."
        ) from None
    # Every process must use the same micro-batch: the smallest that fitted anywhere.
    fits = int(accelerator.gather(torch.tensor([fits], device=accelerator.device)).min().item())
    return BatchGeometry(fits, per_process // fits, processes)
