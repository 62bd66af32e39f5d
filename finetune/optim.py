"""Optimizer, LR schedule and run length, all counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

# Parameters whose names contain these get no weight decay (biases, LayerNorm/RMSNorm weights).
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW (or plain SGD) over the trainable parameters, weight decay on weight matrices only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(n in name for n in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    # The fused kernel (CPU and CUDA) is what Trainer uses by default too: one pass over all parameters.
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def steps_per_epoch(micro_batches_per_epoch: int, accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: the last window may be short but still steps."""
    return math.ceil(micro_batches_per_epoch / accumulation_steps)


def total_optimizer_steps(
    micro_batches_per_epoch: int, accumulation_steps: int, epochs: int, max_steps: int | None
) -> int:
    """Length of the run in optimizer steps: max_steps if given, else epochs x steps per epoch."""
    return max_steps if max_steps else epochs * steps_per_epoch(micro_batches_per_epoch, accumulation_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    total_steps: int,
    warmup: float = 0,
) -> LambdaLR:
    """Linear warmup then linear/cosine decay or constant, over `total_steps` optimizer steps.

    `warmup` >= 1 counts optimizer steps; below 1 it is a share of `total_steps` (Trainer's convention).
    """
    warmup = int(warmup) if warmup >= 1 else math.ceil(warmup * total_steps)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
