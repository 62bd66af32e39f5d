"""A run's batches: the batch geometry once the model is in memory, the collators, the dataloaders, and the
model prepared with its optimizer — what every recipe does the same way between loading a model and `fit`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset

from finetune.core import optim, quantization
from finetune.core.compile import batch_collators
from finetune.core.data import CollatedOnce, longest_batch, make_dataloader
from finetune.core.fsdp import prepare_fsdp
from finetune.core.geometry import BatchGeometry, find_micro_batch_size
from finetune.core.memory import rehearse_step
from finetune.core.modeling import apply_lora, lora_follows_autocast, parameter_counts
from finetune.core.precision import WEIGHT_DTYPES, check_trainable_dtypes
from finetune.core.startup import startup
from finetune.training import levers
from finetune.training.launch import settle_geometry
from finetune.training.run import Run
from finetune.training.step import LossFn

# A collator for the given length buckets (None: dynamic padding; see finetune.core.compile)
MakeCollator = Callable[[object], Callable[[list[dict]], dict]]


def prepare_model(run: Run, model: torch.nn.Module, lora_task_type: str, adapt=None):
    """The memory levers the config asks for (gradient checkpointing, LoRA; `adapt(model)` after LoRA: e.g. the
    chunked loss head), the trainable weights' dtype checked, the optimizer, and both prepared by Accelerate."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type=lora_task_type)
        if accelerator.mixed_precision in ("bf16", "fp16"):
            lora_follows_autocast(model)
    if quantization.is_quantized(model):  # adapters and a head come in the compute dtype beside a quantized base
        quantization.cast_trainable(model, WEIGHT_DTYPES[cfg.train.weights_dtype])
    if adapt is not None:
        adapt(model)
    check_trainable_dtypes(model, cfg.train.weights_dtype)
    trainable, total = parameter_counts(model)
    run.log.info(f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)")
    optimizer = optim.build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.optimizer)
    prepare_fsdp(accelerator, model)  # a no-op unless launched with FSDP2: see finetune/core/fsdp.py
    model, optimizer = accelerator.prepare(model, optimizer)
    startup.mark("model")
    return model, optimizer


@dataclass
class Loaders:
    train: object  # prepared: each process its shard, in accumulation windows
    validation: object  # prepared (sharded), or collated once and run whole on every process


def batch_geometry(
    run: Run, model, optimizer, train_set: Dataset, val_set: Dataset, collate, loss: LossFn
) -> BatchGeometry:
    """The run's batch geometry: the config's, or with `micro_batch_size: auto` the largest micro-batch whose whole
    optimizer step (and an evaluation batch) fits in memory, found by rehearsing on the longest examples."""
    if run.geometry is not None:
        return run.geometry
    accelerator, cfg = run.accelerator, run.cfg
    eval_batch = longest_batch(val_set, collate, cfg.eval.batch_size, accelerator.device)
    geometry = find_micro_batch_size(
        accelerator,
        cfg.train.global_batch_size,
        lambda size, steps: rehearse_step(
            accelerator.unwrap_model(model),  # no all-reduce: each process rehearses on its own
            optimizer,
            levers.training_loss(cfg.train, loss),
            longest_batch(train_set, collate, size, accelerator.device),
            steps,
            eval_batch,
        ),
    )
    run.geometry = settle_geometry(accelerator, geometry, cfg.train.max_grad_norm)
    return run.geometry


def evaluation_batch_size(run: Run, model, micro_batch_size: int) -> int:
    """eval.batch_size, bounded so that an evaluation batch never needs more memory than a training micro-batch.

    A forward without gradients holds one layer's working set at a time; training holds, for each of its rows,
    every layer's saved activations (with gradient checkpointing: every layer's input, and one layer's working set
    in backward). So an evaluation of micro_batch_size x layers rows (with checkpointing: micro_batch_size rows)
    needs at most what the training step needs. With `micro_batch_size: auto` the rehearsal that picked the
    micro-batch ran an evaluation batch of eval.batch_size already."""
    cfg = run.cfg
    if cfg.train.micro_batch_size == "auto":
        return cfg.eval.batch_size
    config = run.accelerator.unwrap_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or 1
    bound = micro_batch_size * (1 if cfg.train.gradient_checkpointing else layers)
    if cfg.eval.batch_size > bound:
        run.log.info(
            f"evaluation in batches of {bound}, not eval.batch_size={cfg.eval.batch_size}: an evaluation batch "
            f"needs no more memory than a training micro-batch of {micro_batch_size} then"
        )
        return bound
    return cfg.eval.batch_size


def make_loaders(
    run: Run,
    model,
    optimizer,
    train_set: Dataset,
    val_set: Dataset,
    make_collator: MakeCollator,
    loss: LossFn,
    group_by_length: bool,
    shard_validation: bool = True,
) -> Loaders:
    """The training and validation dataloaders, prepared. `shard_validation=False` keeps the validation set whole
    on every process, collated once for every evaluation (a causal LM's token-weighted loss counts each token once).
    """
    accelerator, cfg = run.accelerator, run.cfg
    geometry = batch_geometry(run, model, optimizer, train_set, val_set, make_collator(None), loss)
    eval_rows = evaluation_batch_size(run, model, geometry.micro_batch_size)
    train_collate, val_collate = batch_collators(  # train.compile: a few static shapes, see finetune/core/compile.py
        make_collator, cfg.train.compile, cfg.data.max_length, geometry.micro_batch_size, eval_rows
    )
    train_loader = make_dataloader(
        train_set,
        geometry.micro_batch_size,
        train_collate,
        shuffle=True,
        num_workers=cfg.train.num_workers,
        group_by_length=group_by_length,
        seed=cfg.train.seed,
        global_batch_size=geometry.global_batch_size,
    )
    val_loader = make_dataloader(val_set, eval_rows, val_collate, longest_first=True)
    if shard_validation:
        return Loaders(*accelerator.prepare(train_loader, val_loader))
    return Loaders(accelerator.prepare(train_loader), CollatedOnce(val_loader))
