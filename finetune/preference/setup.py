"""What the DPO recipe decides around its model: whether the reference can be built for this launch, dropout off,
the settings a precomputed reference depends on, and the batches final/'s merge check runs on."""

from __future__ import annotations

from accelerate.utils import DistributedType
from torch import nn

from finetune.core.errors import UserError
from finetune.core.quantization import MODEL_INPUTS
from finetune.core.schemas import DPOConfig


def reference_kind(cfg: DPOConfig, accelerator) -> str:
    """dpo.reference resolved for this launch (`DPOConfig.reference_kind`; under FSDP auto is precomputed), or a
    UserError for a reference the launch cannot hold, before any weights load."""
    fsdp = accelerator.distributed_type == DistributedType.FSDP or getattr(accelerator, "is_fsdp2", False)
    sharded = fsdp or accelerator.distributed_type == DistributedType.DEEPSPEED
    kind = cfg.reference_kind()
    if kind == "model" and sharded:
        raise UserError(
            f"dpo.reference=model under {accelerator.distributed_type.value}: the frozen copy would be whole on every "
            "process, not sharded. Set dpo.reference=precomputed (no second model in memory) or, with LoRA, "
            "adapter_off."
        )
    if kind == "adapter_off" and fsdp:
        if cfg.dpo.reference == "auto":
            return "precomputed"
        # FSDP2 (torch 2.13) fails the gradient reduce of a step whose module also ran a no-grad forward with the
        # adapters off: "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float".
        raise UserError(
            "dpo.reference=adapter_off under FSDP: FSDP2 fails the step after a forward with the adapters off. Set "
            "dpo.reference=precomputed (or auto): the reference's log-probs are computed once before training."
        )
    return kind


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of the model (its own and LoRA's) at 0, as TRL's DPO does: the policy's log-probs are then those
    of the model as it will be used, comparable with the reference's (computed in eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention read from the config
            module.attention_dropout = 0.0


def reference_settings(cfg: DPOConfig, accelerator) -> dict:
    """What changes precomputed reference log-probs beside the pairs' tokens and the weights: part of the cache key."""
    model = cfg.model
    return {
        "model": model.name_or_path,
        "revision": model.revision,
        "random_init_seed": cfg.train.seed if model.random_init else None,
        "attn_implementation": model.attn_implementation,
        "quantization": model.quantization,
        "double_quant": model.double_quant,
        "weights_dtype": cfg.train.weights_dtype,
        "mixed_precision": accelerator.mixed_precision,
        "chunked_loss": cfg.train.chunked_loss,
        "device": accelerator.device.type,
    }


def merge_check_batches(batches):
    """Validation pair batches as plain rows of sequences, (B, 2, W) -> (2B, W), for `reporting.merge_check` (a
    QLoRA final/)."""
    for batch in batches:
        pairs = batch["input_ids"].dim() == 3
        yield {name: batch[name].flatten(0, 1) if pairs else batch[name] for name in MODEL_INPUTS if name in batch}
