"""`--dry-run`: check and resolve everything a run needs, and say what it would do, without training.

The recipe's `setup()` has already checked the config, the output dir, the checkpoint to resume, the data
and the model's limits, and built the Accelerator for the launch in use. The dry run adds what training
would find out later: the data after tokenization (label counts, token-length percentiles, how many get
truncated), the batch geometry and optimizer steps, the parameters (with LoRA) and an estimate of peak
memory per process, all from the model's config (`finetune.plan.memory_estimate`): no weights are read.
Nothing is written.
"""

from __future__ import annotations

import math
from unittest import mock

from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune.core.optim import total_optimizer_steps
from finetune.training.run import Run

LAUNCH_KINDS = {"NO": "single process", "MULTI_CPU": "DDP on CPU", "MULTI_GPU": "DDP", "DEEPSPEED": "DeepSpeed"}


def sharding(accelerator: Accelerator) -> str:
    """How the launch shards training state: none (DDP), zero1/2/3, or fsdp."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP or getattr(accelerator, "is_fsdp2", False):
        return "fsdp"
    return "none"


def candidate_micro_batches(train, processes: int) -> list[int]:
    """Micro-batch sizes `auto` could pick: powers of two up to the per-process share of the global batch."""
    largest = max(1, (train.global_batch_size or 1) // processes)
    sizes = [2**i for i in range(int(math.log2(largest)) + 1)]
    return sizes if sizes[-1] == largest else [*sizes, largest]


def levers_text(cfg, chunked_loss: bool) -> str:
    """The memory levers the estimate assumes, as the config sets them."""
    model, train = cfg.model, cfg.train
    levers = []
    if model.quantization:
        levers.append(f"{model.quantization} base weights" + (", double-quantized" if model.double_quant else ""))
    if cfg.lora.enabled:
        levers.append(f"LoRA r={cfg.lora.r}")
    levers.append(f"{train.optimizer} optimizer")
    levers.append(f"{train.weights_dtype} trained weights")
    if train.gradient_checkpointing:
        levers.append("gradient checkpointing")
    if chunked_loss:
        levers.append("chunked loss")
    if train.activation_offload:
        levers.append("activation offload")
    return ", ".join(levers)


def report_dry_run(
    run: Run,
    data_lines: list[str],
    train_rows: int,
    seq_len: int,
    model_config,
    auto_class,
    sequences_per_example: int = 1,
    reference_copy: bool = False,
    loss_tokens_per_example: int | None = None,
    lora=None,
) -> None:
    """Print the dry run (main process): launch, data, batches and steps, parameters, memory per process.

    `train_rows`: training examples (or packed rows); `seq_len`: tokens in the longest training row, the
    shape memory peaks at; `model_config` and `auto_class` build the meta model the estimate counts.
    `sequences_per_example`: rows each example puts through the model (a preference pair: 2); `reference_copy`: a
    frozen second copy of the weights is held (DPO's dpo.reference=model); `loss_tokens_per_example`: the tokens that
    carry loss in the longest example (None: all of them); `lora`: the LoRA group as the run applies it (None: the
    config's)."""
    from finetune.plan.memory_estimate import estimate_memory  # torch-heavy; only a dry run needs it

    accelerator, cfg, geometry = run.accelerator, run.cfg, run.geometry
    chunked_loss = getattr(cfg.train, "chunked_loss", False)  # SFT's lever
    if not accelerator.is_main_process:
        return
    processes = accelerator.num_processes
    kind = LAUNCH_KINDS.get(accelerator.distributed_type.value, accelerator.distributed_type.value)
    kind += "" if sharding(accelerator) == "none" else f", {sharding(accelerator)}"
    lines = [
        "dry run: everything checked; nothing trained, nothing written",
        f"launch: {processes} process(es) ({kind}), device {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}, weights {cfg.train.weights_dtype}",
        "data:",
        *(f"  {line}" for line in data_lines),
    ]
    micro_sizes = [geometry.micro_batch_size] if geometry else candidate_micro_batches(cfg.train, processes)
    if geometry:
        batches_per_epoch = math.ceil(math.ceil(train_rows / geometry.micro_batch_size) / processes)
        steps = total_optimizer_steps(
            batches_per_epoch, geometry.accumulation_steps, cfg.train.epochs, cfg.train.max_steps
        )
        lines.append(f"batches: {geometry.describe()}; {batches_per_epoch:,} micro-batches per process per epoch")
        lines.append(
            f"optimizer steps: {steps:,}" + (f" ({cfg.train.epochs} epochs)" if not cfg.train.max_steps else "")
        )
    else:
        lines.append(
            f"batches: micro_batch_size=auto: the largest of {micro_sizes} that fits is found at start "
            f"(global batch {cfg.train.global_batch_size})"
        )

    def estimate(micro: int):
        accumulation = (
            geometry.accumulation_steps if geometry else (cfg.train.global_batch_size or 1) // (micro * processes)
        )
        estimate = estimate_memory(
            model_config,
            auto_class,
            micro_batch_size=micro * sequences_per_example,
            seq_len=seq_len,
            weights_dtype=cfg.train.weights_dtype,
            mixed_precision=accelerator.mixed_precision,
            optimizer=cfg.train.optimizer,
            lora=(lora or cfg.lora) if cfg.lora.enabled else None,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            chunked_loss=chunked_loss,
            loss_tokens=micro * loss_tokens_per_example if loss_tokens_per_example else None,
            quantization=cfg.model.quantization,
            double_quant=cfg.model.double_quant,
            activation_offload=cfg.train.activation_offload,
            num_processes=processes,
            sharding=sharding(accelerator),
            device_type=accelerator.device.type,
            gradient_accumulation_steps=max(1, accumulation),
        )
        if reference_copy:  # the frozen copy holds the base weights as loaded: as many bytes as the trained model's
            estimate.reference = estimate.weights
            estimate.notes.append("the reference model is a frozen copy of the weights (dpo.reference=model)")
        return estimate

    # Under ZeRO-3 transformers builds even a meta model through deepspeed.zero.Init, a collective; only this
    # process is here, and the estimate divides by the processes itself.
    with mock.patch("transformers.modeling_utils.is_deepspeed_zero3_enabled", return_value=False):
        estimates = {micro: estimate(micro) for micro in micro_sizes}
    largest = estimates[micro_sizes[-1]]
    share = 100 * largest.trainable_params / max(largest.total_params, 1)
    lora = " with LoRA" if cfg.lora.enabled else ""
    lines.append(f"parameters: {largest.total_params:,}, {largest.trainable_params:,} trainable{lora} ({share:.2f}%)")
    if len(estimates) > 1:
        lines.append(f"peak memory per process by micro-batch of {seq_len} tokens (estimate):")
        lines += [f"  {micro:>5}: {estimate.peak / 2**20:,.1f} MiB" for micro, estimate in estimates.items()]
    lines.append(f"memory levers: {levers_text(cfg, chunked_loss)}")
    rows = "" if sequences_per_example == 1 else f" ({sequences_per_example} sequences each)"
    lines.append(f"peak memory per process at micro-batch {micro_sizes[-1]}{rows} x {seq_len} tokens (estimate):")
    lines += [f"  {line}" for line in largest.describe().splitlines()]
    print("\n".join(lines), flush=True)
