"""finetune-eval for preference models (recipes/dpo.py): the loss and the preference statistics (rewards, accuracy,
log-probs) of each model over every pair once, against a reference model, and with eval.num_generations=N
exact_match of greedy answers to the first N prompts against the chosen completion; by the code training evaluates
with (`finetune.preference.evaluate.preference_metrics`), in fp32. Per model eval_results.json (and
generations.jsonl); for a run, the reference as a row of its own.

The reference is the run's model.name_or_path (the model training started from, which adapter_off, precomputed and
model references all are), or reference.name_or_path. Its log-probs are computed once, before any model is scored,
and carried by the batches: one model in memory at a time, one reference pass for every model. The pairs are
tokenized once, by the first model's tokenizer (a run's models all save the tokenizer they trained with).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.core import quantization
from finetune.core.data import is_hub_dataset, make_dataloader, read_source, read_validation
from finetune.core.errors import UserError
from finetune.core.modeling import load_causal_lm, load_tokenizer
from finetune.core.paths import local_path, looks_like_path
from finetune.core.saved_models import (
    ModelToScore,
    ScoredModels,
    format_scores,
    is_full_model_dir,
    is_whole_run,
    results_dir,
)
from finetune.core.schemas import DPODataConfig, ScoreDPOConfig, ScoreDPOLossConfig, ScoreLMModelConfig, SFTModelConfig
from finetune.core.token_cache import content_hash
from finetune.lm.probes import enable_exact_chunked_loss
from finetune.lm.score import (
    BASE_WEIGHT_FILES,
    TOKENIZER_FILES,
    check_lm_max_length,
    lm_adapter_base,
    load_lm,
    saved_max_length,
    scorable_lms,
    scoring_config,
    write_scores,
)
from finetune.preference.collate import ANSWER_TOKENS, REFERENCE_COLUMN, PreferenceCollator
from finetune.preference.data import check_preference_chat_template, load_preference_data, normalise_pairs, pairs_format
from finetune.preference.evaluate import preference_metrics
from finetune.preference.loss import PreferenceLoss
from finetune.preference.reference import ModelReference, PrecomputedReference, pair_values
from finetune.preference.tokenize import TOKEN_COLUMNS, preference_generation_prompts, tokenize_pairs

# On each model's line and in the leaderboard (those the results hold: exact_match with generations only).
SHOWN_SCORES = (
    "loss",
    "accuracy",
    "rewards/margin",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "pairs",
    "exact_match",
)
REFERENCE_ROW = "reference"  # the reference's row of a run's leaderboard, and its results sub-dir


@dataclass
class ScoredPairs:
    """What every model is scored on: the collated batches (with the reference's log-probs once computed), the
    prompts to generate from, and what they were made of."""

    batches: list[dict]
    prompts: list[dict]
    tokenizer: PreTrainedTokenizerBase
    description: str  # `PairReport.describe()`
    fingerprint: str


def score_preference_models(
    path: Path, models: list[ModelToScore], run_dir: Path | None, saved: dict | None, overrides: list
) -> ScoredModels:
    """finetune-eval for preference models: the reference's log-probs once, then every model on the same pairs, a
    line on stdout each; for a whole run the reference first, as a row of its own."""
    cfg = load_dpo_config(run_dir, saved, overrides)
    given = {key for key, _ in overrides}
    base_given = "model.name_or_path" in given and bool(cfg.model.name_or_path)
    models = scorable_lms(models, cfg, base_given)
    reference = reference_source(cfg, base_given)
    metric_for_best = cfg.metric_for_best(((saved or {}).get("eval") or {}).get("metric_for_best"))
    if run_dir is None and "data.max_length" not in given:  # an exported model: its tokenizer holds training's
        cfg = replace(cfg, data=replace(cfg.data, max_length=saved_max_length(models[0].path, cfg.data.max_length)))
    pairs = load_pairs(cfg.data, have_source=run_dir is not None or bool({"data.validation", "data.train"} & given))
    whole_run = is_whole_run(path, run_dir)
    base = results_dir(path, cfg.output.dir)

    accelerator = Accelerator()
    scored = tokenized_pairs(pairs, model_tokenizer(models[0].path, cfg, base_given), cfg)
    rows = []
    # The run's starting model is its step 0: what the policy was before the first update.
    reference_info = ModelToScore(REFERENCE_ROW, Path(reference), None if cfg.reference.name_or_path else 0)
    reference_out = base / REFERENCE_ROW if whole_run else None
    scored, results = score_reference(accelerator, reference_info, cfg, models, scored, reference_out)
    if results is not None:
        rows.append({"model": REFERENCE_ROW, **results})
        print(f"{REFERENCE_ROW}: " + format_scores(results, SHOWN_SCORES))
    for model_info in models:
        out_dir = base / model_info.name if whole_run else base
        model = prepared(accelerator, load_lm(model_info.path, cfg, base_given, accelerator.device)[1], cfg)
        results = score_preference_model(accelerator, model, model_info, cfg, scored, out_dir, reference)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            print(f"{model_info.name}: " + format_scores(results, SHOWN_SCORES))
    accelerator.end_training()
    columns = ["model", "step", *(k for k in SHOWN_SCORES if rows and k in rows[-1]), "best"]
    return ScoredModels(rows, metric_for_best, columns, base)


def load_dpo_config(run_dir: Path | None, saved: dict | None, overrides: list[tuple[str, str]]) -> ScoreDPOConfig:
    """Defaults < the run's model, data, dpo loss and evaluation keys < the command line."""
    groups = {"model": ScoreLMModelConfig, "data": DPODataConfig, "dpo": ScoreDPOLossConfig}
    return scoring_config(ScoreDPOConfig, run_dir, saved, overrides, groups)


def reference_source(cfg: ScoreDPOConfig, base_given: bool) -> str:
    """reference.name_or_path, else the run's model.name_or_path (or model.name_or_path given here); refused when it
    cannot be loaded: the random weights of a model.random_init run, a local dir that is gone or holds no weights."""
    source = cfg.reference.name_or_path
    if not source:
        if cfg.model.random_init and not base_given:
            raise UserError(
                "the reference of a model.random_init run is its starting model, whose random weights were never "
                "saved: it cannot be loaded. Give a saved model to score against: reference.name_or_path=<model dir>."
            )
        if not cfg.model.name_or_path:
            raise UserError(
                "no reference to score against: give reference.name_or_path=<model dir or Hub id> (a model outside "
                "a run dir has no config.yaml to take the run's starting model from)."
            )
        source = cfg.model.name_or_path
    where = local_path(source, "reference.name_or_path")
    if where is None and looks_like_path(source):
        raise UserError(
            f"reference.name_or_path={source}: no such model dir. Give a saved model (config.json and "
            "model.safetensors) or a Hub id: reference.name_or_path=<model>."
        )
    if where is not None and not any((where / name).is_file() for name in BASE_WEIGHT_FILES):
        raise UserError(
            f"reference.name_or_path={source}: no model weights there (a full model's config.json and "
            "model.safetensors; a LoRA adapter cannot be the reference). Give a saved model: "
            "reference.name_or_path=<model>."
        )
    return source


def load_pairs(data: DPODataConfig, have_source: bool) -> Dataset:
    """The pairs to score, normalised as `finetune.preference.data.load_preference_data` normalises them.

    data.validation is read as a file when it is a local path (else as a split of data.train's Hub dataset, as
    training reads it); without data.validation, the run's validation pairs are carved from data.train again
    (same data.validation_fraction and data.split_seed)."""
    if not have_source:
        raise UserError(
            "no pairs to score on: give data.validation=<file> (.jsonl, .json, .csv, .tsv or .parquet with chosen "
            "and rejected columns); a model outside a run dir has no config.yaml to take them from."
        )
    if data.validation is None:
        return load_preference_data(data).validation
    key = f"data.validation ({data.validation})"
    spec = data.validation
    is_file = local_path(spec, "data.validation") is not None or looks_like_path(spec)
    if not is_file and is_hub_dataset(data.train, "data.train"):
        rows = read_validation(data)  # a split of the run's Hub dataset
    else:
        rows = read_source(spec, "data.validation")
    return normalise_pairs(rows, data, key)[0]


def model_tokenizer(path: Path, cfg: ScoreDPOConfig, base_given: bool) -> PreTrainedTokenizerBase:
    """The tokenizer a model dir holds, or that of an adapter's base model (as `load_lm` picks it)."""
    model_cfg = SFTModelConfig(name_or_path=str(path), trust_remote_code=cfg.model.trust_remote_code)
    if is_full_model_dir(path) or any((path / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(model_cfg)
    return load_tokenizer(replace(model_cfg, name_or_path=lm_adapter_base(path, cfg, base_given)))


def tokenized_pairs(pairs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: ScoreDPOConfig) -> ScoredPairs:
    """The pairs as training tokenizes them (`tokenize_pairs`) and collates its validation batches: padded, longest
    first, eval.batch_size pairs each; the same batches on every process."""
    check_preference_chat_template(cfg.data, tokenizer, pairs_format(pairs))
    dataset, report = tokenize_pairs(pairs, tokenizer, cfg.data, "validation")
    collate = PreferenceCollator.for_tokenizer(tokenizer)
    batches = list(make_dataloader(dataset, cfg.eval.batch_size, collate, longest_first=True))
    prompts = preference_generation_prompts(pairs, tokenizer, cfg.eval.num_generations)
    fingerprint = content_hash(dataset.select_columns(TOKEN_COLUMNS))[:16]
    return ScoredPairs(batches, prompts, tokenizer, report.describe(), fingerprint)


def reference_loading(cfg: ScoreDPOConfig, models: list[ModelToScore], device) -> dict:
    """load_causal_lm's arguments for the reference: fp32, or quantized as the run's adapters' base was trained (the
    reference of a QLoRA run is that quantized base, its adapters off), read from the first adapter scored."""
    adapters = [m.path for m in models if not is_full_model_dir(m.path)]
    if not adapters or cfg.reference.name_or_path:
        return {"dtype": torch.float32}
    return {"dtype": torch.float32, **quantization.adapter_base_loading(adapters[0], device)}


@torch.no_grad()
def with_reference_logps(accelerator, reference: ModelReference, batches: list[dict]) -> list[dict]:
    """`batches` with the reference's log-probs of their pairs (`ref_logps`, (B, 2)), for every model scored next."""
    values = pair_values(accelerator, batches, lambda batch: reference.logps(None, batch))
    sizes = [len(batch[ANSWER_TOKENS]) for batch in batches]
    return [{**batch, REFERENCE_COLUMN: part} for batch, part in zip(batches, values.split(sizes), strict=True)]


def score_reference(
    accelerator, info: ModelToScore, cfg: ScoreDPOConfig, models: list[ModelToScore], scored: ScoredPairs, out_dir
) -> tuple[ScoredPairs, dict | None]:
    """(the pairs with the reference's log-probs, the reference's own results or None). The reference scored as a
    model (`out_dir` given: a whole run) is its own baseline: rewards 0 and accuracy 0 (no pair's chosen reward is
    above its rejected one), loss log 2 for dpo.loss=sigmoid; its log-probs and exact_match are the starting
    point the models moved from."""
    model_cfg = SFTModelConfig(
        name_or_path=str(info.path),
        revision=None if cfg.reference.name_or_path else cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    model = load_causal_lm(model_cfg, scored.tokenizer, **reference_loading(cfg, models, accelerator.device))
    model = prepared(accelerator, model, cfg)
    batches = with_reference_logps(accelerator, ModelReference(model, contextlib.nullcontext), scored.batches)
    scored = replace(scored, batches=batches)
    if out_dir is None:
        return scored, None
    return scored, score_preference_model(accelerator, model, info, cfg, scored, out_dir, str(info.path))


def prepared(accelerator, model: torch.nn.Module, cfg: ScoreDPOConfig) -> torch.nn.Module:
    """The model as training computes log-probs (chunked, when its head allows), on the device. No DDP wrapper:
    nothing trains; the batches are split over the processes."""
    check_lm_max_length(cfg.data.max_length, model.config)
    if cfg.eval.chunked_loss:
        try:
            enable_exact_chunked_loss(model)
        except UserError:  # a model whose logits the chunked loss cannot reproduce: the plain log-probs are the same
            pass
    return model if quantization.is_quantized(model) else model.to(accelerator.device)  # quantized: loaded there


def score_preference_model(
    accelerator, model, model_info: ModelToScore, cfg: ScoreDPOConfig, scored: ScoredPairs, out_dir: Path, reference
) -> dict | None:
    """The preference metrics (and exact_match) of one `prepared` model against the reference's log-probs the
    batches carry, by the recipe's evaluation on every process; the main process writes eval_results.json (and
    generations.jsonl) and returns the results."""
    loss = PreferenceLoss(cfg.dpo, PrecomputedReference())
    metrics = preference_metrics(accelerator, model, scored.batches, loss, on_nonfinite="warn")
    data = {"reference": reference, "data": scored.description, "data_fingerprint": scored.fingerprint}
    return write_scores(
        accelerator, model, scored.tokenizer, scored.prompts, cfg.eval, metrics, model_info, out_dir, data
    )
