"""4-bit and 8-bit base weights (QLoRA) through bitsandbytes and transformers' BitsAndBytesConfig.

`model.quantization: nf4 | fp4 | int8` loads every linear layer of the base model quantized and frozen, except the
output layer and a classifier head (kept, like embeddings and norms, in the compute dtype; a fresh head trains in
fp32). The compute dtype is the mixed precision's (bf16/fp16), else `train.weights_dtype`'s. LoRA adapters train on
top (QLoRA) in `train.weights_dtype` (fp32 by default).

What peft's `prepare_model_for_kbit_training` does, and what this does instead:
- it freezes every weight: peft's `get_peft_model` freezes the base anyway, and `finetune.core.modeling.apply_lora`
  is what the recipes call;
- it casts every fp16/bf16 weight to fp32: only the trainable ones are cast here (`cast_trainable`); the frozen
  embeddings and output layer stay in the compute dtype (an fp32 copy of an 8B model's would take 4 GiB more);
- it turns gradient checkpointing on (reentrant, so inputs must require grad): the recipes turn it on only when
  `train.gradient_checkpointing` says so, non-reentrant, which needs no input gradients.

The merge (`merged_state_dict`) adds each adapter's delta to the *dequantized* base weight, which is the weight the
adapter was trained against; merging onto the original full-precision weights (or re-quantizing the merge, as peft's
`merge_and_unload` on a 4-bit layer does) adds the quantization error back (peft #2105, axolotl #1263).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.core.errors import UserError
from finetune.core.precision import WEIGHT_DTYPES

QUANT_EXTRA = "pip install -e '.[quant]' (or pip install 'bitsandbytes>=0.50')"
FOUR_BIT = ("nf4", "fp4")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Heads of sequence classifiers (peft's SEQ_CLS modules_to_save): fresh and trained, never quantized.
CLASSIFIER_HEADS = ("classifier", "score")


def compute_dtype(mixed_precision: str | None, weights_dtype: str) -> torch.dtype:
    """The dtype quantized layers compute in and the other frozen weights are kept in."""
    return HALF_DTYPES.get(mixed_precision or "no", WEIGHT_DTYPES[weights_dtype])


_ABSENT = object()


def import_bitsandbytes(key: str = "model.quantization"):
    """bitsandbytes, imported without reaching for the network.

    On x86 CPUs with AVX512-BF16 its import tries to fetch an optimized 4-bit inference kernel from the Hub
    (`kernels-community/quantization-bitsandbytes`, through the `kernels` package) and logs a warning when that
    fails: offline that is noise at best and a wait on the network at worst. The fetch is blocked (bitsandbytes then
    uses its own CPU kernels, as it does on every other CPU) and the fallback's warning is silenced."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{key} needs bitsandbytes, which is not installed: {QUANT_EXTRA}.")
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, kernels = cpu_ops_log.level, sys.modules.get("kernels", _ABSENT)
    cpu_ops_log.setLevel(logging.ERROR)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: no Hub lookup
    try:
        import bitsandbytes
    finally:
        cpu_ops_log.setLevel(level)
        if kernels is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


def quiet_bitsandbytes() -> None:
    """Import bitsandbytes quietly (`import_bitsandbytes`) if it is installed, before peft does: peft imports it
    whenever it is installed, and would let it reach for the Hub."""
    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None:
        import_bitsandbytes()


def unquantized_modules(skeleton: torch.nn.Module) -> list[str]:
    """Modules to keep out of quantization: transformers' defaults (the output layer, tied weights, the last
    module) and a classifier head, which is fresh and trains."""
    from transformers.quantizers.base import get_keys_to_not_convert

    names = {name for name, _ in skeleton.named_children()}
    return sorted(set(get_keys_to_not_convert(skeleton)) | {head for head in CLASSIFIER_HEADS if head in names})


def quantizable_linears(skeleton: torch.nn.Module) -> list[str]:
    """The linear layers bitsandbytes would quantize."""
    skipped = unquantized_modules(skeleton)
    return [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skipped)
    ]


def check_quantization(model_cfg, accelerator, skeleton: torch.nn.Module) -> None:
    """Refuse, before any weights load, a quantization that cannot work with this launch or with the model
    (`skeleton`: the model on the meta device)."""
    from accelerate.utils import DistributedType

    import_bitsandbytes()
    key = f"model.quantization={model_cfg.quantization}"
    kind = accelerator.distributed_type
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if kind == DistributedType.DEEPSPEED else None
    if kind == DistributedType.FSDP or getattr(accelerator, "is_fsdp2", False) or zero_stage == 3:
        launch = "FSDP" if zero_stage is None else "DeepSpeed ZeRO-3"
        raise UserError(
            f"{key} under {launch}: sharding quantized weights needs them stored in the compute dtype "
            "(bnb_4bit_quant_storage) and a sharding-aware load that this toolkit does not do. Launch with DDP "
            "(every process holds the quantized base: it is small) or DeepSpeed ZeRO-1/2, or train without "
            "model.quantization."
        )
    if accelerator.device.type not in ("cpu", "cuda"):
        raise UserError(f"{key} on a {accelerator.device.type} device: bitsandbytes runs on CUDA GPUs and x86 CPUs.")
    if not quantizable_linears(skeleton):
        raise UserError(
            f"{key}: this model ({type(skeleton).__name__}) has no torch.nn.Linear layers for bitsandbytes "
            "to quantize (e.g. GPT-2's Conv1D layers). Train it without model.quantization."
        )


def loading_kwargs(model_cfg, mixed_precision: str | None, weights_dtype: str, device, skip: list[str]) -> dict:
    """from_pretrained's arguments for the quantized base: its BitsAndBytesConfig, the compute dtype, and the
    process's device (bitsandbytes quantizes as weights reach it; Accelerate does not move a quantized model)."""
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()
    dtype = compute_dtype(mixed_precision, weights_dtype)
    if model_cfg.quantization in FOUR_BIT:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_cfg.quantization,
            bnb_4bit_use_double_quant=model_cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": config, "dtype": dtype, "device_map": {"": torch.device(device)}}


@contextmanager
def saved_random_weights(model: torch.nn.Module):
    """`model` (random weights, from its config) written to a temporary dir: quantized loading reads a checkpoint."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="finetune-random-init-") as tmp:
        # Written by hand: every process needs its copy, and save_pretrained writes on rank 0 only
        model.config.to_json_file(Path(tmp) / "config.json")
        save_model(model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        yield Path(tmp)


def keep_training_numerics(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes' CPU inference path for 4-bit layers (x86 CPUs with AVX512-BF16): in eval mode without
    gradients it repacks each weight in place into another layout and computes in bf16, so that evaluation would
    not compute what training does, and the frozen weights' bytes (hashed by checkpoints) would change."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft


def is_quantized(model: torch.nn.Module) -> bool:
    base = _base(model)
    return any(getattr(base, flag, False) for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"))


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Trainable weights (LoRA adapters, a classifier head) in `dtype`: loaded beside a quantized base they come in
    its compute dtype, in which small updates are lost."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def quantization_record(model: torch.nn.Module) -> dict | None:
    """The quantization a model was loaded with (its BitsAndBytesConfig as a dict), or None: a checkpoint keeps it."""
    base = _base(model)
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return None
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
    record = {k: raw[k] for k in keep if k in raw}
    record["bnb_4bit_compute_dtype"] = str(raw.get("bnb_4bit_compute_dtype"))
    return record


# --------------------------------------------------------------------------------------------
# Merging onto the dequantized base
# --------------------------------------------------------------------------------------------


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as the layer computes with it (fp32), or a plain layer's weight."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        bnb = import_bitsandbytes()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=layer.state).float()
    return weight.detach().float()


def merged_state_dict(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's state dict, every quantized layer dequantized and its LoRA delta added in fp32, then cast to
    `dtype`, on the CPU; names as the plain (unquantized) transformers model has them. One layer on the device at a
    time: the merge fits wherever training did."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = dequantized_weight(module.get_base_layer())
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
            merged[f"{name}.weight"] = weight.to(dtype).cpu()
            if module.get_base_layer().bias is not None:
                merged[f"{name}.bias"] = module.get_base_layer().bias.detach().to(dtype).cpu()
        elif type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
            plain = _plain_name(f"{name}.weight")
            if plain in merged:  # the base layer of an adapted layer: merged above
                continue
            merged[plain] = dequantized_weight(module).to(dtype).cpu()
            if getattr(module, "bias", None) is not None:
                merged[plain.removesuffix("weight") + "bias"] = module.bias.detach().to(dtype).cpu()
    for name, tensor in base.state_dict().items():
        clean = _plain_name(name)
        if clean is None or clean in merged or not tensor.is_floating_point():
            continue
        merged[clean] = tensor.detach().to(dtype).cpu()
    return merged


def _plain_name(name: str) -> str | None:
    """A state-dict key of the peft-wrapped, quantized base as the plain model names it; None for what the plain
    model does not have (quantization constants, adapters)."""
    if ".lora_" in name or name.endswith((".absmax", ".quant_map", ".quant_state", ".SCB", ".weight_format")):
        return None
    if "quant_state." in name or ".nested_" in name:
        return None
    name = name.replace(".base_layer.", ".")
    # modules_to_save (a classifier head): the trained copy is what the merged model keeps
    if ".original_module." in name:
        return None
    return name.replace(".modules_to_save.default.", ".")


def plain_model_from(peft_model, dtype: torch.dtype) -> torch.nn.Module:
    """The unquantized transformers model of `peft_model`'s architecture with its merged weights (`merged_state_dict`)
    in `dtype`, on the CPU: what final/ saves, loadable by `pipeline()`."""
    base = peft_model.get_base_model()
    config = base.config.__class__.from_dict(base.config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._is_quantized = False
    state = merged_state_dict(peft_model, dtype)
    with torch.device("meta"):
        plain = type(base)._from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name not in _tied_names(plain)]
    if missing or unexpected:
        raise RuntimeError(f"merging onto the dequantized base: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, buffer in list(plain.named_buffers()):  # non-persistent ones (rotary frequencies): the base's
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            plain.get_submodule(module_name)._buffers[attr] = base.get_buffer(name).detach().cpu()
    plain.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = base.generation_config
    return plain.eval()


def _tied_names(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def compute_dtype_of(peft_model) -> torch.dtype:
    """The dtype a quantized model computes in: that of its (unquantized, frozen) input embeddings."""
    return peft_model.get_base_model().get_input_embeddings().weight.dtype


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def merge_gap(peft_model, batches, device, autocast, max_batches: int = 2) -> dict:
    """The largest absolute logit difference between the quantized model with its adapter and the merged model
    final/ saves (`plain_model_from`), over the first `max_batches` batches, and the largest logit for scale. The
    merged model is built on the CPU and moved to `device`; where it does not fit, nothing is measured (said so)."""
    from itertools import islice

    from finetune.core.memory import is_out_of_memory, release_memory

    merged = plain_model_from(peft_model, compute_dtype_of(peft_model))
    try:
        merged.to(device)
        gap, scale, batches_seen = 0.0, 0.0, 0
        was_training = peft_model.training
        peft_model.eval()
        with torch.no_grad(), autocast():
            for batch in islice(batches, max_batches):
                inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
                adapted = peft_model(**inputs).logits.float()
                plain = merged(**inputs).logits.float()
                gap = max(gap, float((adapted - plain).abs().max()))
                scale = max(scale, float(adapted.abs().max()))
                batches_seen += 1
        peft_model.train(was_training)
        return {"max_logit_difference": gap, "max_abs_logit": scale, "batches": batches_seen}
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        return {"not_measured": "the merged model does not fit in device memory beside the trained one"}
    finally:
        del merged
        release_memory()


def adapter_base_loading(adapter_dir: Path, device) -> dict:
    """from_pretrained's arguments to load an adapter's base as it was trained: quantized as the config.json saved
    beside the adapter says (`finetune.core.modeling.write_base_config`), on `device`; {} for an unquantized base.
    An adapter trained on a quantized base is scored on that base, not on the full-precision weights (whose
    difference from the quantized ones the adapter never saw)."""
    import json

    config_file = Path(adapter_dir) / "config.json"
    saved = json.loads(config_file.read_text()).get("quantization_config") if config_file.is_file() else None
    if not saved:
        return {}
    from transformers import BitsAndBytesConfig

    import_bitsandbytes("scoring an adapter trained on a quantized base")
    config = BitsAndBytesConfig.from_dict(saved)
    dtype = config.bnb_4bit_compute_dtype if config.load_in_4bit else torch.float32
    return {"quantization_config": config, "dtype": dtype, "device_map": {"": torch.device(device)}}
