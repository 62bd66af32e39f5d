"""Load tokenizers, configs and models from a local dir, an installed package, or the Hub."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import is_compiled_module
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune.core import quantization
from finetune.core.errors import UserError, first_line
from finetune.core.paths import local_path
from finetune.core.run_dir import replace_dir

# Tokenizers without a real limit report this sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 10**9


def model_source(name_or_path: str) -> str:
    """What to pass to from_pretrained: a local dir (resolving `package:`) or a Hub id as given."""
    path = local_path(name_or_path, "model.name_or_path")
    return str(path) if path is not None else name_or_path


def load_pretrained(loader, cfg, what: str, **kwargs):
    source = model_source(cfg.name_or_path)
    try:
        return loader.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.name_or_path={cfg.name_or_path!r}: could not load the {what}: {first_line(err)}. "
            "Give a local model dir, `package:<pkg>/<dir>`, or a Hub id (the Hub needs network; "
            "offline only cached models load)."
        ) from None


def load_tokenizer(cfg) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg` (a ModelConfig); models without a pad token pad with EOS."""
    tokenizer = load_pretrained(AutoTokenizer, cfg, "tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg, **overrides) -> PretrainedConfig:
    """The model's config alone (cheap: no weights), with `overrides` applied."""
    return load_pretrained(AutoConfig, cfg, "model config", **overrides)


def max_model_length(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest input the model takes, from its position embeddings or its tokenizer."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)]
    if tokenizer.model_max_length and tokenizer.model_max_length < _NO_LIMIT:
        limits.append(tokenizer.model_max_length)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def check_max_length(max_length: int, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """`data.max_length` above what the model takes is an error, before any weights load."""
    limit = max_model_length(config, tokenizer)
    if limit is not None and max_length > limit:
        raise UserError(
            f"data.max_length={max_length} is above the model's limit of {limit} tokens; set it <= {limit}."
        )


# --------------------------------------------------------------------------------------------
# Memory levers: gradient checkpointing and LoRA
# --------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"


def build_skeleton(config: PretrainedConfig, auto_class=AutoModelForSequenceClassification) -> PreTrainedModel:
    """The model `config` describes, on the meta device (no memory, no weights): to read its layers' names."""
    with torch.device("meta"):
        return auto_class.from_config(config)


def linear_module_names(config: PretrainedConfig, auto_class=AutoModelForSequenceClassification) -> list[str]:
    """Names of the linear layers of a model built from `config`, on the meta device (no memory)."""
    skeleton = build_skeleton(config, auto_class)
    return [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]


def check_lora_targets(lora, config: PretrainedConfig, auto_class=AutoModelForSequenceClassification) -> None:
    """Every `lora.target_modules` entry must match a linear layer (peft matches names or name suffixes)."""
    if not lora.enabled or lora.target_modules == [ALL_LINEAR]:
        return
    names = linear_module_names(config, auto_class)
    unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(
            f"lora.target_modules: {unmatched} match no linear layer of this model. "
            f"Its linear layers end in: {', '.join(suffixes[:12])}; or use [{ALL_LINEAR}]."
        )


def apply_lora(model: PreTrainedModel, lora, task_type: str = "SEQ_CLS") -> torch.nn.Module:
    """Wrap `model` with LoRA adapters. peft's task type says what else trains: SEQ_CLS keeps the fresh
    classification head fully trainable; CAUSAL_LM trains the adapters alone (the LM head stays frozen)."""
    quantization.quiet_bitsandbytes()
    from peft import LoraConfig, TaskType, get_peft_model

    targets = ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else list(lora.target_modules)
    peft_config = LoraConfig(
        task_type=TaskType[task_type],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def lora_follows_autocast(model: torch.nn.Module) -> None:
    """Under mixed precision, LoRA adapters compute as every other layer does: in autocast's dtype, from their fp32
    weights. peft casts each adapter's input to the adapters' dtype (fp32) by default: a full-precision copy of
    every adapted layer's input, kept for backward (at 8B and 4,096 tokens, 224 MiB for one MLP input alone)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())  # under ZeRO-3 a parameter holds only its shard

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())


def write_model(accelerator: Accelerator, model, tokenizer, target: Path, max_length: int, merge_lora: bool) -> None:
    """Weights (safetensors), config with label names and tokenizer into `target`; every process calls it.

    A LoRA model is written merged (a plain transformers model, loadable by `pipeline`) with its adapter
    in `target/adapter/`, or, with `merge_lora=False` (mid-training: merging would change the model being
    trained), as the adapter alone. An adapter dir holds the base model's config.json (`write_base_config`) and the
    tokenizer too, so that it loads, and is scored, on its own.
    """
    if is_compiled_module(model):  # train.compile: its state dict would prefix every name with _orig_mod.
        model = model._orig_mod
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP/ZeRO-3: every process calls it
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    tokenizer.model_max_length = max_length  # so pipeline(..., truncation=True) cuts where training did
    if hasattr(unwrapped, "merge_and_unload"):  # a peft model
        adapter_dir = target / "adapter" if merge_lora else target
        unwrapped.save_pretrained(adapter_dir, state_dict=state_dict)
        write_base_config(unwrapped, adapter_dir)
        if merge_lora:
            tokenizer.save_pretrained(adapter_dir)
            merged_model(unwrapped).save_pretrained(target)
    else:
        unwrapped.save_pretrained(target, state_dict=state_dict)
    tokenizer.save_pretrained(target)


def merged_model(peft_model) -> PreTrainedModel:
    """The adapter merged into its base: onto the dequantized weights of a quantized base, in its compute dtype
    (`quantization.plain_model_from`), else by peft."""
    if quantization.is_quantized(peft_model):
        return quantization.plain_model_from(peft_model, quantization.compute_dtype_of(peft_model))
    return peft_model.merge_and_unload()


def write_base_config(peft_model, adapter_dir: Path) -> None:
    """The base model's config.json beside its peft adapter.

    It names the head (num_labels, id2label, label2id, problem_type), which finetune-eval would otherwise rebuild
    from the head's tensor shapes and the run's data, and the model's class (`architectures`, as save_pretrained
    sets it: a classifier on a *ForCausalLM base is no causal LM); in a checkpoint's model/ it also marks the
    weights complete (`finetune.training.checkpoints.layout`). transformers' own from_pretrained of such a dir
    looks for base weights in it: load the adapter with peft onto its base model."""
    base = peft_model.get_base_model()
    base.config.architectures = [type(base).__name__.removeprefix("FSDP")]  # FSDP2 prefixes the wrapped class
    base.config.save_pretrained(adapter_dir)


def save_final(
    accelerator: Accelerator,
    model,
    tokenizer,
    target: Path,
    max_length: int,
    add_files: Callable[[Path], object] | None = None,
) -> None:
    """`write_model` (merged) into `target` atomically: a crash leaves only a `.tmp-*` dir beside it.
    `add_files(dir)` writes more into the unfinished dir on the main process (the run's end adds the model card)."""
    tmp = target.with_name(f".tmp-{target.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    write_model(accelerator, model, tokenizer, tmp, max_length, merge_lora=True)
    if accelerator.is_main_process:
        if add_files is not None:
            add_files(tmp)
        replace_dir(tmp, target)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Causal language models
# --------------------------------------------------------------------------------------------


def load_causal_lm(
    cfg, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32, **quantized
) -> PreTrainedModel:
    """An AutoModelForCausalLM from `cfg` (an SFTModelConfig), its weights in `dtype` whatever the checkpoint
    stores; `cfg.random_init` builds it from its config.json with fresh weights (seeded by the caller).
    `quantized`: `finetune.core.quantization.loading_kwargs` (its quantization_config and device_map)."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.random_init:
        config = load_model_config(cfg, **extra)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        if quantized:  # bitsandbytes quantizes weights as a checkpoint loads: write the random ones out first
            skip_unquantized(quantized, model)
            with quantization.saved_random_weights(model) as saved:
                model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, **extra, **quantized)
            model.name_or_path = model.config._name_or_path = config._name_or_path  # not the temporary dir
    else:
        if quantized:
            skip_unquantized(quantized, build_skeleton(load_model_config(cfg, **extra), AutoModelForCausalLM))
        model = load_pretrained(AutoModelForCausalLM, cfg, "model", dtype=dtype, **extra, **quantized)
    if quantized:
        quantization.keep_training_numerics(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def skip_unquantized(quantized: dict, skeleton: torch.nn.Module) -> None:
    """Keep the output layer and a classifier head out of quantization (`quantization.unquantized_modules`)."""
    quantized["quantization_config"].llm_int8_skip_modules = quantization.unquantized_modules(skeleton)
