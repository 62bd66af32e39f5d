"""FSDP2 through Accelerate (1.15): what a transformers model needs before `accelerator.prepare(model, optimizer)`.

`prepare_fsdp(accelerator, model)` does nothing unless the run was launched with an FSDP2 config
(`accelerate_configs/fsdp.yaml`). Otherwise it works around three problems, each of which stops or
silently corrupts a run:

- **The embeddings sharded twice** (`fit_wrap_policy`). Accelerate wraps every module whose class the
  model's `_no_split_modules` names, then shards the input embedding, and the final norm with the output
  embedding, as units of their own. BERT lists its embeddings block (`BertEmbeddings`), which holds the
  input embedding, so the embedding is sharded a second time and torch fails with "Invariant encountered:
  value was None when it should not be".
- **A fresh head on the meta device** (`materialize_meta_parameters`). With `fsdp_cpu_ram_efficient_loading`,
  `from_pretrained` leaves the weights missing from the checkpoint (the new classification head) on the
  meta device on every process but the first: the first broadcasts them in `prepare`. But Accelerate
  matches the optimizer's parameters to the sharded ones by storage address, 0 for every meta tensor, so
  the head's weight and bias become one parameter in those processes' optimizers.
- **CPU processes** (`enable_fsdp_on_cpu`). With `ACCELERATE_USE_CPU=true` Accelerate ignores the FSDP
  config (it selects FSDP only for accelerator devices) and trains with DDP, which cannot move that meta
  head ("Cannot copy out of meta tensor"). torch's FSDP2 runs on CPU over gloo, so the run becomes the FSDP2
  run it was launched as: the same sharding, broadcast and checkpoints as on GPUs.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from finetune.core.errors import UserError


def launched_with_fsdp2() -> bool:
    """`accelerate launch` with an FSDP config sets these (`fsdp_version` defaults to 1)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") == "2"


def prepare_fsdp(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Fit the FSDP2 setup to `model`; call right before `accelerator.prepare(model, optimizer)`.
    Does nothing unless launched with an FSDP2 config."""
    if not launched_with_fsdp2():
        return
    if accelerator.distributed_type == DistributedType.MULTI_CPU:  # an Accelerator not made by make_accelerator
        enable_fsdp_on_cpu(accelerator)
    plugin = accelerator.state.fsdp_plugin
    fit_wrap_policy(plugin, model)
    if plugin.cpu_ram_efficient_loading:
        materialize_meta_parameters(model)


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Make a run of CPU processes launched with an FSDP config an FSDP run, with the launcher's settings
    (`AcceleratorState.__init__` only does so for accelerator device types)."""
    if torch._C._get_accelerator().type != "cpu":  # fully_shard's default mesh is on torch's accelerator
        raise UserError(
            "FSDP on CPU processes (ACCELERATE_USE_CPU=true) on a machine with an accelerator: hide it "
            "(CUDA_VISIBLE_DEVICES=) or launch without ACCELERATE_USE_CPU."
        )
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerator builds it
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As AcceleratorState.__init__ ends: each later AcceleratorState() copies PartialState's value over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def own_unit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules Accelerate's FSDP2 preparation shards as units of their own: the input embedding, the
    output embedding and the final norm (`accelerate.utils.fsdp_utils.fsdp2_prepare_model`)."""
    try:
        from accelerate.utils.fsdp_utils import _find_final_norm
    except ImportError:  # an Accelerate that does not carve out the final norm
        _find_final_norm = None  # noqa: N806
    found = [
        getattr(model, "get_input_embeddings", lambda: None)(),
        getattr(model, "get_output_embeddings", lambda: None)(),
        _find_final_norm(model) if _find_final_norm else None,
    ]
    return [module for module in found if isinstance(module, torch.nn.Module)]


def fit_wrap_policy(plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module) -> list[str] | None:
    """Set the layer classes to wrap: those of `fsdp_transformer_layer_cls_to_wrap`, or else the model's
    `_no_split_modules`, less any class whose modules contain a module Accelerate shards on its own
    (`BertEmbeddings`, holding the input embedding: the embedding then gets its own unit and the rest of
    the block joins the root unit). Returns the classes (None: not the transformer-based wrap policy)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return None
    given = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")  # what the launcher passes from the config
    names = given.split(",") if given else list(getattr(model, "_no_split_modules", None) or [])
    units = {id(module) for module in own_unit_modules(model)}
    unit_names = [name for name, module in model.named_modules() if id(module) in units]
    containing = {
        type(module).__name__
        for name, module in model.named_modules()
        if any(unit.startswith(f"{name}.") if name else unit for unit in unit_names)
    }
    plugin.transformer_cls_names_to_wrap = sorted(name for name in names if name not in containing)
    return plugin.transformer_cls_names_to_wrap


def materialize_meta_parameters(model: torch.nn.Module) -> list[str]:
    """Give each parameter on the meta device uninitialised CPU storage of its own; returns their names.

    These are the weights `from_pretrained` did not load on this process (see the module docstring);
    `prepare` overwrites them with the first process's values, so what is stored here is never read."""
    names = []
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            # Swapped into the same Parameter object, which the optimizer holds (`.data =` cannot leave meta).
            storage = torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
            torch.utils.swap_tensors(param, storage)
            names.append(name)
    return names
