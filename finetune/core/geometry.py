"""Batch geometry: global batch = micro-batch x accumulation steps x processes.

A config states either the micro-batch and the accumulation steps, or the global batch (then the
accumulation steps follow). `micro_batch_size: auto` finds the largest micro-batch with which a whole
optimizer step fits in memory and raises the accumulation steps to keep the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from finetune.core.errors import UserError
from finetune.core.memory import HEADROOM, DeviceMemory, is_out_of_memory, release_memory


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
    rehearse: Callable[[int, int], None],
    memory: DeviceMemory | None = None,
) -> BatchGeometry:
    """The largest micro-batch with which a whole optimizer step fits in memory, agreed by all processes;
    the accumulation steps keep the global batch.

    Candidates are the divisors of the per-process global batch, largest first. `rehearse(size,
    accumulation_steps)` runs one step's worth of memory with that micro-batch (see
    `finetune.core.memory.rehearse_step`); a size fits when it raises no out-of-memory error and, where the device
    reports its limit, peaks at most `HEADROOM` of it.
    """
    processes = accelerator.num_processes
    if global_batch_size % processes:
        raise UserError(f"train.global_batch_size={global_batch_size} is not divisible by the {processes} processes.")
    memory = memory or DeviceMemory(accelerator.device)
    per_process = global_batch_size // processes
    fits, tried = 0, []
    for size in (d for d in range(per_process, 0, -1) if per_process % d == 0):
        release_memory()
        memory.reset_peak()
        try:
            rehearse(size, per_process // size)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            tried.append(f"{size} (out of memory)")
            del err  # its traceback holds the failed attempt's tensors
            continue
        peak, limit = memory.peak(), memory.limit()
        if peak is not None and limit is not None and peak > HEADROOM * limit:
            tried.append(f"{size} (peak {peak / 2**20:,.0f} MiB > {HEADROOM:.0%} of {limit / 2**20:,.0f} MiB)")
            continue
        fits = size
        break
    release_memory()
    # Every process must use the same micro-batch: the smallest that fitted anywhere (0: none did somewhere).
    fits = int(accelerator.gather(torch.tensor([fits], device=accelerator.device)).min().item())
    if not fits:
        raise UserError(
            f"train.micro_batch_size=auto: no micro-batch fits in memory with its optimizer step and "
            f"an evaluation batch (tried {', '.join(tried) or 'on another process'}). Lower data.max_length or "
            "eval.batch_size, turn on train.gradient_checkpointing or lora.enabled, or launch with "
            "accelerate_configs/deepspeed_zero3_offload.yaml."
        )
    return BatchGeometry(fits, per_process // fits, processes)
