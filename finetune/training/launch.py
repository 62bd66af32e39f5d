"""The Accelerator a recipe trains with, consistent with how it was launched.

Launch settings (processes, DDP/FSDP/DeepSpeed, mixed precision) come from `accelerate launch` and
its config file; the recipe config says what to train. Where both could set a value (mixed precision,
DeepSpeed's batch geometry and clipping) a disagreement is an error that names both, raised before any
model loads, instead of one silently winning.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from finetune.core.compile import dynamo_plugin
from finetune.core.errors import UserError
from finetune.core.fsdp import enable_fsdp_on_cpu, launched_with_fsdp2
from finetune.core.geometry import BatchGeometry, plan_batches
from finetune.core.run_dir import RunDir
from finetune.training.checkpoints.weights import keep_weights_once

LAUNCHER_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"

# Accelerate's AcceleratedOptimizer.step asks importlib whether lomo_optim is installed, twice per optimizer step
# and uncached (find_spec, then the package metadata). The answer cannot change while the process runs.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def check_mixed_precision(recipe_value: str | None) -> str | None:
    """The mixed precision to pass to Accelerator; a recipe value the launcher contradicts is an error."""
    launcher_value = os.environ.get(LAUNCHER_MIXED_PRECISION)
    if recipe_value is None or launcher_value is None or launcher_value.lower() == recipe_value:
        return recipe_value
    raise UserError(
        f"train.mixed_precision={recipe_value} (recipe config) conflicts with mixed precision "
        f"'{launcher_value}' from the launcher (accelerate config file or `accelerate launch --mixed_precision`). "
        f"Remove train.mixed_precision to use the launcher's, or launch with --mixed_precision {recipe_value}."
    )


def make_accelerator(
    train, trackers: list[str] | None = None, output_dir: Path | None = None
) -> tuple[Accelerator, BatchGeometry | None]:
    """An Accelerator for `train` (a TrainConfig) logging to `trackers` (see `finetune.training.tracking`; local
    ones write under `output_dir`/logs), and the batch geometry (None for `auto` micro-batches, decided later by
    `finetune.training.batches.batch_geometry`), applied by `settle_geometry`.

    - `sync_with_dataloader=False`: `finetune.training.accumulation.accumulation_windows` decides where windows end.
    - `step_scheduler_with_optimizer=False`: recipes step the LR scheduler once per optimizer step
      (Accelerate's default steps it once per process per step).
    - `use_seedable_sampler=True`: the shuffle order depends on the seed and epoch only.
    - `non_blocking` on a GPU: batches (pinned by `finetune.core.data.make_dataloader`) are copied asynchronously.
    - checkpoints hold the weights once, in model/ (`finetune.training.checkpoints.weights.keep_weights_once`).
    """
    mixed_precision = check_mixed_precision(train.mixed_precision)
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator: without an explicit backend Accelerate sees a single process
        # while DeepSpeed starts gloo over all of them, and the batch-size assertion fails.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        skip_deepspeed_shm_comm()
    try:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, non_blocking=torch.cuda.is_available()
            ),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
            log_with=trackers or None,
            dynamo_plugin=dynamo_plugin(train),
            project_config=ProjectConfiguration(
                project_dir=str(output_dir) if output_dir else None,
                logging_dir=str(RunDir(output_dir).logs) if output_dir else None,
            ),
        )
    except ValueError as err:  # e.g. fp16 requested on a machine that cannot run it
        raise UserError(f"cannot set up Accelerate: {err}") from None
    if launched_with_fsdp2() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        enable_fsdp_on_cpu(accelerator)  # Accelerate would run it as DDP: see finetune/core/fsdp.py
    keep_weights_once(accelerator)
    if train.compile and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"train.compile=true under {accelerator.distributed_type.value}: not supported by finetune yet (compiled "
            "runs are tested in one process); set train.compile=false."
        )
    geometry = plan_batches(train, accelerator.num_processes)
    if geometry is None and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            "train.micro_batch_size=auto probes an unsharded model, which says nothing under DeepSpeed or FSDP; "
            "set train.micro_batch_size to a number."
        )
    if geometry is not None:
        settle_geometry(accelerator, geometry, train.max_grad_norm)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(train.cpu_threads or cpu_threads_per_process())
    return accelerator, geometry


def skip_deepspeed_shm_comm() -> None:
    """Start DeepSpeed's CPU backend without its shared-memory all-reduce op (`deepspeed_shm_comm`).

    DeepSpeed JIT-compiles that op when it starts the process group (about 2.5 minutes on 2 cores, at a run's first
    DeepSpeed start on the machine), for `inference_all_reduce` only (DeepSpeed inference and AutoTP); ZeRO training
    reduces over gloo either way. DeepSpeed builds it only if its op probe, a dict kept for the process
    (`deepspeed.ops.__compatible_ops__`), says the op can be built: marked as not, DeepSpeed leaves it out.
    """
    try:
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    except (ImportError, AttributeError, TypeError):  # another DeepSpeed: it may build the op, nothing else changes
        pass


def cpu_threads_per_process() -> int:
    """This machine's usable cores shared among the processes on it.

    `accelerate launch` without a config sets OMP_NUM_THREADS=1, which halves CPU training speed on a
    2-core laptop; the recipe config (train.cpu_threads) is the place to pin a number.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local_processes)


def settle_geometry(accelerator: Accelerator, geometry: BatchGeometry, max_grad_norm: float | None) -> BatchGeometry:
    """Apply a decided batch geometry: the one place the Accelerator's accumulation steps and DeepSpeed's batch
    sizes are set (from the config at launch, or after `micro_batch_size: auto` found the micro-batch)."""
    accelerator.gradient_accumulation_steps = geometry.accumulation_steps
    reconcile_deepspeed(accelerator, geometry, max_grad_norm)
    return geometry


def reconcile_deepspeed(accelerator: Accelerator, geometry: BatchGeometry, max_grad_norm: float | None) -> None:
    """Make the DeepSpeed config agree with the recipe: fill `auto` values, reject contradictions.

    DeepSpeed asserts train_batch_size == micro_batch * accumulation * world_size and Accelerate would
    otherwise silently prefer DeepSpeed's accumulation steps; here the recipe is the one source of truth.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": (geometry.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (geometry.accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (geometry.global_batch_size, "micro-batch x accumulation x processes"),
        "gradient_clipping": (max_grad_norm or 0.0, "train.max_grad_norm"),
    }
    conflicts = []
    for name, (value, recipe_key) in wanted.items():
        current = ds_config.get(name, "auto")
        if current != "auto" and current is not None and float(current) != float(value):
            conflicts.append(f"DeepSpeed `{name}` is {current}, but the recipe gives {value} ({recipe_key})")
    if conflicts:
        raise UserError(
            "the DeepSpeed config disagrees with the recipe config:\n  - "
            + "\n  - ".join(conflicts)
            + '\nSet these to "auto" in the DeepSpeed config (the recipe then fills them) or change the recipe keys.'
        )
    for name, (value, _) in wanted.items():
        ds_config[name] = value
    plugin.gradient_accumulation_steps = geometry.accumulation_steps
