"""The weights of a checkpoint: written once in model/, read back bitwise, a LoRA base hashed (a quantized one with
its quantization)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel

from finetune.core.errors import UserError
from finetune.core.quantization import quantization_record, quiet_bitsandbytes
from finetune.core.run_dir import write_json
from finetune.training.checkpoints.layout import BASE_MODEL_FILE, MODEL_DIR


def keep_weights_once(accelerator: Accelerator) -> None:
    """Checkpoints hold the weights once, in model/: `save_state` skips them and `load_state` reads model/.

    Only the weights Accelerate itself would write are affected (one process or DDP); DeepSpeed and FSDP save
    their sharded model state through their own engines, which the hooks never see. A checkpoint written before
    this (state/model.safetensors) still loads as it was written."""
    fingerprints: dict[int, str | None] = {}  # the frozen weights never change: hash them once per model

    def fingerprint(model) -> str | None:
        unwrapped = extract_model_from_parallel(model, keep_torch_compile=False)
        if id(unwrapped) not in fingerprints:
            fingerprints[id(unwrapped)] = frozen_weights_hash(unwrapped)
        return fingerprints[id(unwrapped)]

    def skip_weights(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process and models and (digest := fingerprint(models[0])) is not None:
            quantized = quantization_record(extract_model_from_parallel(models[0], keep_torch_compile=False))
            write_json(
                Path(output_dir) / BASE_MODEL_FILE, {"frozen_weights_xxh3_128": digest, "quantization": quantized}
            )
        weights.clear()

    def load_weights(models: list, input_dir: str) -> None:
        state_dir = Path(input_dir)
        if not models or (state_dir / "model.safetensors").is_file():  # an older checkpoint, weights in state/
            return
        saved = state_dir / BASE_MODEL_FILE
        base = json.loads(saved.read_text()) if saved.is_file() else {}
        quantized = quantization_record(extract_model_from_parallel(models[0], keep_torch_compile=False))
        if base and base.get("quantization") != quantized:
            raise UserError(
                f"{state_dir.parent} was trained on a base quantized as {base.get('quantization')}, but this run "
                f"loads it as {quantized}: its adapter and optimizer state belong to the other. Resume with the "
                "checkpoint's model.quantization and model.double_quant (and the same mixed precision)."
            )
        if base and base["frozen_weights_xxh3_128"] != fingerprint(models[0]):
            raise UserError(
                f"{state_dir.parent} was trained with LoRA on a different base model: the frozen weights of "
                "model.name_or_path do not hash to what the checkpoint recorded. Resume with the base model the run "
                "started from."
            )
        load_model_dir(extract_model_from_parallel(models[0], keep_torch_compile=False), state_dir.parent / MODEL_DIR)
        models.clear()

    accelerator.register_save_state_pre_hook(skip_weights)
    accelerator.register_load_state_pre_hook(load_weights)


def frozen_weights_hash(model: torch.nn.Module) -> str | None:
    """`parameters_hash` of every frozen parameter, or None when all of them train."""
    frozen = [(name, param) for name, param in model.named_parameters() if not param.requires_grad]
    return parameters_hash(frozen) if frozen else None


def parameters_hash(named_tensors) -> str:
    """xxh3-128 of (name, tensor) pairs: each name, dtype, shape and the bytes themselves."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name, param in named_tensors:
        tensor = param.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # the buffer itself: no copy
    return digest.hexdigest()


def load_model_dir(model: torch.nn.Module, model_dir: Path) -> None:
    """Copy the weights a checkpoint's model/ holds into `model` (the unwrapped training model), bitwise.

    model/ is what `finetune.core.modeling.write_model` wrote: a peft adapter, or save_pretrained safetensors
    (one file or shards); tied weights saved once are filled through their tie."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        quiet_bitsandbytes()
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise UserError(f"{adapter} does not fit the model: unexpected {', '.join(result.unexpected_keys[:3])}")
        return
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no model*.safetensors weights.")
    state = {name: tensor for file in files for name, tensor in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in missing if name not in params or id(params[name]) not in loaded]  # ties are fine
    problems = [f"{kind} {', '.join(names[:3])}" for kind, names in (("missing", missing), ("unexpected", unexpected))]
    if missing or unexpected:
        raise UserError(f"{model_dir} does not fit the model: {'; '.join(problems)}")
