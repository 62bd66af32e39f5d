"""finetune-eval for causal LMs (recipes/sft.py): loss per target token and perplexity, summed over every target
token once (the tokens training puts loss on: data.train_on_prompt and the rest of the run's data keys), and with
eval.num_generations=N exact_match of greedy generations for the first N prompts; by the code training evaluates
with (`finetune.lm.evaluate.evaluate_lm`), in fp32. Per model eval_results.json (and generations.jsonl)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset

from finetune.core import quantization
from finetune.core.config import COMMAND_LINE, build_config
from finetune.core.data import is_hub_dataset, make_dataloader, read_source, read_validation
from finetune.core.errors import UserError, first_line, is_rank_zero
from finetune.core.modeling import load_causal_lm, load_tokenizer
from finetune.core.paths import local_path, looks_like_path
from finetune.core.run_dir import write_json
from finetune.core.saved_models import (
    ADAPTER_CONFIG,
    WEIGHT_FILES,
    ModelToScore,
    ScoredModels,
    format_scores,
    is_full_model_dir,
    is_whole_run,
    results_dir,
)
from finetune.core.schemas import ScoreLMConfig, ScoreLMModelConfig, SFTDataConfig, SFTModelConfig
from finetune.lm.collate import SFTCollator
from finetune.lm.data import check_chat_template, data_format, load_sft_data, normalise, resolve_format
from finetune.lm.evaluate import evaluate_lm, generate_greedy, score_generations, write_generations
from finetune.lm.loss import next_token_loss
from finetune.lm.packing import pack_examples
from finetune.lm.probes import check_packing_supported, enable_exact_chunked_loss
from finetune.lm.tokenize import generation_prompts, tokenize_sft

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
BASE_WEIGHT_FILES = (*WEIGHT_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json")
# On each model's line and in the leaderboard (those the results hold: exact_match with generations only).
SHOWN_SCORES = ("loss", "perplexity", "tokens", "exact_match")


def score_causal_lms(
    path: Path, models: list[ModelToScore], run_dir: Path | None, saved: dict | None, overrides: list
) -> ScoredModels:
    """finetune-eval for causal LMs: every model on the same examples, a line on stdout each."""
    cfg = load_lm_config(run_dir, saved, overrides)
    given = {key for key, _ in overrides}
    base_given = "model.name_or_path" in given and bool(cfg.model.name_or_path)
    models = scorable_lms(models, cfg, base_given)
    metric_for_best = cfg.metric_for_best(((saved or {}).get("eval") or {}).get("metric_for_best"))
    if run_dir is None and "data.max_length" not in given:  # an exported model: its tokenizer holds training's
        cfg = replace(cfg, data=replace(cfg.data, max_length=saved_max_length(models[0].path, cfg.data.max_length)))
    examples = load_lm_examples(cfg.data, have_source=run_dir is not None or "data.train" in given)
    whole_run = is_whole_run(path, run_dir)
    base = results_dir(path, cfg.output.dir)

    accelerator = Accelerator()
    rows = []
    for model_info in models:
        out_dir = base / model_info.name if whole_run else base
        results = score_causal_lm(accelerator, model_info, cfg, examples, out_dir, base_given)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            print(f"{model_info.name}: " + format_scores(results, SHOWN_SCORES))
    accelerator.end_training()
    columns = ["model", "step", *(k for k in SHOWN_SCORES if rows and k in rows[0]), "best"]
    return ScoredModels(rows, metric_for_best, columns, base)


def _known(mapping: dict | None, schema: type) -> dict:
    """The entries of a saved config group that `schema` has (a config.yaml of another version may hold more)."""
    keys = {f.name for f in fields(schema)}
    return {k: v for k, v in (mapping or {}).items() if k in keys}


def scoring_config(schema: type, run_dir: Path | None, saved: dict | None, overrides, groups: dict[str, type]):
    """A causal-LM scorer's config: defaults < the run's `groups` (name -> the schema whose keys are taken) and its
    evaluation keys (batch size, generation length, chunked loss) < the command line."""
    sources = []
    if saved is not None:
        eval_saved = {k: v for k, v in (saved.get("eval") or {}).items() if k in ("batch_size", "max_new_tokens")}
        if "chunked_loss" in (saved.get("train") or {}):
            eval_saved["chunked_loss"] = saved["train"]["chunked_loss"]
        run = {name: _known(saved.get(name), group) for name, group in groups.items()}
        sources.append((str(run_dir / "config.yaml"), {**run, "eval": eval_saved}))
    sources.append((COMMAND_LINE, dict(overrides)))
    return build_config(schema, sources)


def load_lm_config(run_dir: Path | None, saved: dict | None, overrides: list[tuple[str, str]]) -> ScoreLMConfig:
    """Defaults < the run's model, data and evaluation keys < the command line."""
    groups = {"model": ScoreLMModelConfig, "data": SFTDataConfig}
    return scoring_config(ScoreLMConfig, run_dir, saved, overrides, groups)


def load_lm_examples(data: SFTDataConfig, have_source: bool) -> Dataset:
    """The examples to score, normalised as `finetune.lm.data.load_sft_data` normalises them.

    data.validation is read as a file when it is a local path (else as a split of data.train's Hub dataset, as
    training reads it); without data.validation, the run's validation split is carved from data.train again
    (same data.validation_fraction and data.split_seed)."""
    if data.validation is None:
        if not have_source:
            raise UserError(
                "no data to score on: give data.validation=<file> (.jsonl, .json, .csv, .tsv or .parquet of chats, "
                "prompt/completion pairs or text); a model outside a run dir has no config.yaml to take it from."
            )
        return load_sft_data(data).validation
    key = f"data.validation ({data.validation})"
    spec = data.validation
    is_file = local_path(spec, "data.validation") is not None or looks_like_path(spec)
    if not is_file and is_hub_dataset(data.train, "data.train"):
        rows = read_validation(data)  # a split of the run's Hub dataset
    else:
        rows = read_source(spec, "data.validation")
    return normalise(rows, resolve_format(rows.column_names, data, key), data, key)


def lm_adapter_base(path: Path, cfg: ScoreLMConfig, base_given: bool) -> str:
    """The base model to load an adapter onto: model.name_or_path given on the command line, else the adapter's
    base_model_name_or_path when it is a local dir (or there is no other), else the run's model.name_or_path."""
    if base_given:
        return cfg.model.name_or_path
    if cfg.model.random_init:
        raise UserError(random_init_adapter_message(path))
    recorded = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    candidates = [c for c in (recorded, cfg.model.name_or_path) if c]
    if not candidates:
        raise UserError(
            f"{path}: the adapter names no base model (base_model_name_or_path); give it: model.name_or_path=<base>."
        )
    base = next((c for c in candidates if local_path(c, "model.name_or_path") is not None), candidates[0])
    where = local_path(base, "model.name_or_path")
    if where is not None and where.is_dir() and not any((where / name).is_file() for name in BASE_WEIGHT_FILES):
        raise UserError(
            f"{path}: the adapter's base model {base} holds no weights (a config.json only, as for model.random_init): "
            "the base the adapter was trained on cannot be loaded. Give it with model.name_or_path=<base>."
        )
    return base


def random_init_adapter_message(path: Path) -> str:
    return (
        f"{path} is a LoRA adapter of a model.random_init run: its base model's random weights were never saved, so "
        "it cannot be scored. Score the run's final/ (saved with the adapter merged in), or train with "
        "lora.enabled=false to get full checkpoints."
    )


def load_lm(path: Path, cfg: ScoreLMConfig, base_given: bool, device="cpu"):
    """(tokenizer, model in fp32) of a full model dir, or of a peft adapter on its base model, by
    `finetune.core.modeling.load_causal_lm` as training loads it."""
    model_cfg = SFTModelConfig(
        name_or_path=str(path),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    if is_full_model_dir(path):
        tokenizer = load_tokenizer(model_cfg)
        return tokenizer, load_causal_lm(model_cfg, tokenizer, torch.float32)
    base_cfg = replace(model_cfg, name_or_path=lm_adapter_base(path, cfg, base_given), revision=cfg.model.revision)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(model_cfg if has_tokenizer else base_cfg)
    loading = {"dtype": torch.float32, **quantization.adapter_base_loading(path, device)}  # quantized as trained
    model = load_causal_lm(base_cfg, tokenizer, **loading)
    try:
        quantization.quiet_bitsandbytes()  # before peft imports it
        model.load_adapter(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"{path}: could not load the adapter onto {base_cfg.name_or_path}: {first_line(err)}") from None
    return tokenizer, model


def check_lm_max_length(max_length: int, config) -> None:
    """data.max_length within the model's position embeddings (the saved tokenizer's limit is training's
    max_length, which scoring may exceed)."""
    limits = [
        int(x) for x in (getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)) if x
    ]
    if limits and max_length > min(limits):
        raise UserError(f"data.max_length={max_length} is above the model's limit of {min(limits)} tokens.")


def token_fingerprint(ds: Dataset) -> str:
    """Hash of the scored tokens and their targets."""
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    digest = hashlib.sha256()
    for name in ("input_ids", "labels"):
        column = table.column(name).combine_chunks()
        digest.update(np.asarray(column.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
        digest.update(np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def score_causal_lm(
    accelerator, model_info: ModelToScore, cfg: ScoreLMConfig, examples: Dataset, out_dir: Path, base_given: bool
) -> dict | None:
    """Loss, perplexity (and exact_match) of one causal LM, by the recipe's evaluation on every process; the main
    process writes eval_results.json (and generations.jsonl) and returns the results."""
    tokenizer, model = load_lm(model_info.path, cfg, base_given, accelerator.device)
    fmt = data_format(examples)
    check_chat_template(cfg.data, tokenizer, fmt)
    check_lm_max_length(cfg.data.max_length, model.config)
    dataset, report = tokenize_sft(examples, tokenizer, cfg.data)
    if len(dataset) == 0:
        raise UserError(f"no example left to score: {report.describe()}. Check data.max_length and the data.")
    data_fingerprint = token_fingerprint(dataset)
    flatten = cfg.data.packing and (cfg.model.attn_implementation or "").startswith("flash_attention")
    if cfg.data.packing:
        check_packing_supported(model, rows_per_batch=1 if flatten else None)  # flash: one flattened row
        dataset = pack_examples(dataset, cfg.data.max_length)
    if cfg.eval.chunked_loss:
        try:
            enable_exact_chunked_loss(model)
        except UserError:  # a model whose logits the chunked loss cannot reproduce: the plain loss is the same
            pass
    if not quantization.is_quantized(model):  # a quantized base was loaded onto the device
        model = model.to(accelerator.device)  # no DDP wrapper: nothing trains; the batches are split over processes
    loader = make_dataloader(dataset, cfg.eval.batch_size, SFTCollator.for_tokenizer(tokenizer, flatten=flatten))
    metrics = evaluate_lm(accelerator, model, loader, next_token_loss, on_nonfinite="warn")
    prompts = generation_prompts(examples, tokenizer, cfg.eval.num_generations)
    data = {"num_examples": report.kept, "data": report.describe(), "data_fingerprint": data_fingerprint}
    return write_scores(accelerator, model, tokenizer, prompts, cfg.eval, metrics, model_info, out_dir, data)


def write_scores(
    accelerator, model, tokenizer, prompts: list[dict], eval_cfg, metrics: dict, model_info, out_dir: Path, data: dict
) -> dict | None:
    """`metrics` with exact_match of greedy answers to `prompts`; on the main process eval_results.json (with `data`:
    what was scored) and generations.jsonl written and the results returned (None elsewhere). A warning the metrics
    carry (a non-finite loss) is printed and recorded, not raised: a scorer goes on to the next model."""
    completions = generate_greedy(accelerator, model, tokenizer, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size)
    metrics = {**metrics, **score_generations(prompts, completions)}
    warning = metrics.pop("warning", None)
    if not accelerator.is_main_process:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    if prompts:
        write_generations(out_dir / "generations.jsonl", model_info.step, prompts, completions)
    results = {
        "model_path": str(model_info.path),
        "step": model_info.step,
        **metrics,
        **data,
        "warnings": [warning] if warning else [],
    }
    write_json(out_dir / "eval_results.json", results)
    if warning:
        print(f"WARNING: {model_info.name}: {warning}", file=sys.stderr)
    return results


def saved_max_length(path: Path, default: int) -> int:
    """The max_length training saved as the tokenizer's model_max_length (see `write_model`), else `default`."""
    config = path / "tokenizer_config.json"
    limit = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return int(limit) if isinstance(limit, (int, float)) and 1 < limit < 10**9 else default


def scorable_lms(models: list[ModelToScore], cfg: ScoreLMConfig, base_given: bool) -> list[ModelToScore]:
    """The models that can be scored: not the adapters of a model.random_init run (said on stderr, or an error
    when nothing else is left)."""
    if not cfg.model.random_init or base_given:
        return models
    adapters = [m for m in models if not is_full_model_dir(m.path)]
    if len(adapters) == len(models):
        raise UserError(random_init_adapter_message(models[0].path if len(models) == 1 else models[0].path.parent))
    if adapters and is_rank_zero():
        names = ", ".join(m.name for m in adapters)
        print(
            f"skipped {names}: LoRA adapters of a model.random_init run (its base model's random weights were never "
            "saved) cannot be scored",
            file=sys.stderr,
        )
    return [m for m in models if is_full_model_dir(m.path)]
