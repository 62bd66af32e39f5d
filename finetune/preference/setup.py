"""What the DPO recipe decides around its model: whether the reference can be built for this launch, dropout off,
the settings a precomputed reference depends on, and the batches final/'s merge check runs on."""

from __future__ import annotations

from accelerate.utils import DistributedType
from torch import nn

from finetune.core.errors import UserError
from finetune.core.schemas import DPOConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def check_reference(cfg: DPOConfig, accelerator) -> None:
    """Refuse a reference this launch cannot hold, before any weights load."""
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if cfg.reference_kind() == "model" and (sharded or getattr(accelerator, "is_fsdp2", False)):
        raise UserError(
            f"dpo.reference=model under {accelerator.distributed_type.value}: the frozen copy would be whole on every "
            "process, not sharded. Set dpo.reference=precomputed (no second model in memory) or, with LoRA, "
            "adapter_off."
        )


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


class MergeCheckBatches:
    """Validation pair batches as plain rows of sequences, for `reporting.merge_check` (a QLoRA final/)."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            pairs = batch["input_ids"].dim() == 3
            yield {
                name: tensor.flatten(0, 1) if pairs else tensor
                for name, tensor in batch.items()
                if name in MODEL_INPUTS
            }


def merge_check_batches(batches) -> MergeCheckBatches:
    return MergeCheckBatches(batches)
