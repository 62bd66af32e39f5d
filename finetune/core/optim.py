"""Optimizer, LR schedule and run length, all counted in optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

# bitsandbytes' optimizers with 8-bit states (blockwise quantized, dynamic map), by the name train.optimizer gives.
EIGHT_BIT_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}

# Parameters whose names contain these get no weight decay (biases, LayerNorm/RMSNorm weights).
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW (fused; or with 8-bit states: `EIGHT_BIT_OPTIMIZERS`), or plain SGD, over the trainable parameters,
    weight decay on weight matrices only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(n in name for n in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if kind in EIGHT_BIT_OPTIMIZERS:
        from finetune.core.quantization import import_bitsandbytes

        bnb = import_bitsandbytes(f"train.optimizer={kind}")
        # Tensors under 4,096 elements (biases, norms) keep 32-bit states, as bitsandbytes does by default.
        return getattr(bnb.optim, EIGHT_BIT_OPTIMIZERS[kind])(groups, lr=lr)
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


@dataclass
class WarmupThenDecay:
    """The LR factor at an optimizer step: linear warmup from 0, then linear or cosine decay to 0, or constant.

    The same factors as transformers' `get_scheduler` (linear, cosine, constant_with_warmup), without importing
    its Trainer utilities at startup. A dataclass, not a closure: LambdaLR's state dict keeps its fields."""

    kind: str
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        if self.kind == "constant":
            return 1.0
        progress = float(step - self.warmup_steps) / float(max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)


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
    return LambdaLR(optimizer, WarmupThenDecay(kind, warmup, total_steps))
