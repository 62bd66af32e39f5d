"""The dtype of the trained weights, whatever the checkpoint stores.

Most Hub checkpoints store bf16 or fp16 weights, and transformers 5 loads weights in their stored dtype
by default (`from_pretrained(dtype="auto")`). Trained as loaded they fail three ways: fp16 weights under
fp16 mixed precision crash in the gradient scaler ("Attempting to unscale FP16 gradients"); bf16 or fp16
weights under bf16 autocast lose every update smaller than their resolution and can stop learning without
an error; fp16 weights without mixed precision overflow to NaN. Mixed precision means fp32 weights and
optimizer state with low-precision compute, so models load in fp32 (`train.weights_dtype: fp32`, the
default). Pure bf16 weights (`train.weights_dtype: bf16`: half the memory for weights, gradients and AdamW
state, at a known loss of precision) are an explicit choice, and combinations that cannot work are refused
before any weights load.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune.core.errors import UserError

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(weights_dtype: str, accelerator: Accelerator) -> None:
    """Refuse a weights dtype that cannot train with how the run was launched (before the model loads)."""
    if weights_dtype == "fp32":
        return
    mixed = accelerator.mixed_precision
    if mixed == "fp16":
        raise UserError(
            "train.weights_dtype=bf16 with fp16 mixed precision: fp16 compute from bf16 weights overflows, and the "
            "fp16 gradient scaler is for fp32 weights. Launch with --mixed_precision bf16 (or no), "
            "or set train.weights_dtype=fp32."
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"train.weights_dtype=bf16 under {accelerator.distributed_type.value}: it keeps its own fp32 master "
            "weights and casts the model itself. Set train.weights_dtype=fp32 and launch with --mixed_precision bf16."
        )
    if accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            "train.weights_dtype=bf16: this GPU has no bf16 support (pre-Ampere). Set train.weights_dtype=fp32 "
            "and launch with --mixed_precision fp16."
        )


def check_trainable_dtypes(model: torch.nn.Module, weights_dtype: str) -> None:
    """Every trainable parameter must be fp32, or bf16 when pure bf16 was chosen (LoRA adapters stay fp32)."""
    allowed = {torch.float32, WEIGHT_DTYPES[weights_dtype]}
    wrong = [(name, p.dtype) for name, p in model.named_parameters() if p.requires_grad and p.dtype not in allowed]
    if wrong:
        name, dtype = wrong[0]
        raise UserError(
            f"{len(wrong)} trainable parameters are {dtype} (e.g. {name}), but train.weights_dtype={weights_dtype}: "
            "low-precision weights cannot be trained under mixed precision. Load the model in fp32 "
            "(train.weights_dtype=fp32), or check model code that casts its own weights."
        )


class LostUpdateCheck:
    """Share of a weight's updates that its dtype rounds away, measured on the first optimizer step.

    With pure bf16 weights an AdamW update of ~lr is lost whenever it is below half a bf16 ulp of the
    weight (|w| > ~lr * 2**8): at lr 5e-5 that is every weight above ~0.013. Measured on the largest
    trainable matrix, over the elements that had a non-zero gradient (the others are not meant to move).
    """

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        matrices = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        self.name, self.param = max(matrices, key=lambda item: _local(item[1]).numel()) if matrices else (None, None)
        self.lr = lr
        self.measured = self.param is None

    def step(self, optimizer: torch.optim.Optimizer) -> str | None:
        """`optimizer.step()`; the first time, a warning if most of the measured updates were lost."""
        if self.measured or self.param.grad is None:
            optimizer.step()
            return None
        self.measured = True
        before = _local(self.param).detach().clone()
        moved = _local(self.param.grad) != 0
        optimizer.step()
        if not bool(moved.any()):
            return None
        lost = float((_local(self.param).detach() == before)[moved].float().mean())
        if lost < 0.5:
            return None
        return (
            f"train.weights_dtype=bf16: {lost:.0%} of the updates to {self.name} in the first optimizer step were "
            f"smaller than bf16 can represent and were lost (lr {self.lr:g}); the model may barely learn. Use "
            "train.weights_dtype=fp32 (fp32 weights, bf16 compute with --mixed_precision bf16) or a larger train.lr."
        )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 DTensor: this process's shard
