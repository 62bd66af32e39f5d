"""The memory levers a run asks for: checked against the launch and the model's config before any weights load
(`check_levers`), then applied where they act (the weights' loading, the optimizer, the training loss)."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune.core import quantization
from finetune.core.errors import UserError
from finetune.core.modeling import build_skeleton
from finetune.core.offload import with_activation_offload
from finetune.core.optim import EIGHT_BIT_OPTIMIZERS
from finetune.core.precision import WEIGHT_DTYPES


def check_levers(cfg, accelerator: Accelerator, model_config, auto_class) -> None:
    """Refuse levers that cannot work with this launch or model, naming the key and what to do instead."""
    train, device = cfg.train, accelerator.device.type
    if cfg.model.quantization is not None:
        quantization.check_quantization(cfg.model, accelerator, build_skeleton(model_config, auto_class))
    if cfg.model.quantization is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError(
            f"model.quantization={cfg.model.quantization} under DeepSpeed: its engine wraps, casts and partitions "
            "the model itself, which this toolkit has not verified with bitsandbytes layers. Launch with DDP "
            "(`accelerate launch --multi_gpu`): each process holds the small quantized base."
        )
    if train.optimizer == "paged_adamw_8bit" and device != "cuda":
        raise UserError(
            f"train.optimizer=paged_adamw_8bit pages its states between GPU and host memory: there is no GPU here "
            f"({device}). Use train.optimizer=adamw_8bit (8-bit states, runs on CPU) or adamw."
        )
    if train.optimizer in EIGHT_BIT_OPTIMIZERS:
        quantization.import_bitsandbytes(f"train.optimizer={train.optimizer}")
        sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if sharded or getattr(accelerator, "is_fsdp2", False):
            raise UserError(
                f"train.optimizer={train.optimizer} under {accelerator.distributed_type.value}: bitsandbytes steps "
                "whole local tensors, not the sharded ones DeepSpeed and FSDP hand an optimizer. Use "
                "train.optimizer=adamw there (they shard its states already), or launch with DDP."
            )
    if train.activation_offload and device != "cuda":
        raise UserError(
            f"train.activation_offload=true moves activations from GPU memory to host memory: on a {device} they "
            "are in host memory already. Set train.activation_offload=false (or train.gradient_checkpointing=true "
            "to hold fewer of them)."
        )


def weights_loading(cfg, accelerator: Accelerator) -> dict:
    """from_pretrained's arguments for the trained model's weights: their dtype, and with model.quantization the
    bitsandbytes config and this process's device (`finetune.core.quantization.loading_kwargs`)."""
    if cfg.model.quantization is None:
        return {"dtype": WEIGHT_DTYPES[cfg.train.weights_dtype]}
    return quantization.loading_kwargs(
        cfg.model, accelerator.mixed_precision, cfg.train.weights_dtype, accelerator.device, skip=[]
    )


def training_loss(train, loss_fn):
    """The loss the training step (and the memory rehearsal of `micro_batch_size: auto`) runs: with
    train.activation_offload its saved activations wait in host memory."""
    return with_activation_offload(loss_fn) if train.activation_offload else loss_fn
