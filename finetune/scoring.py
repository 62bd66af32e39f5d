"""finetune-eval: score an exported model, a training checkpoint, or every model of a run.

    finetune-eval runs/classify                        # every checkpoint and final/, on the run's validation data
    finetune-eval runs/classify/final data.validation=other.csv data.text_column=sentence
    finetune-eval runs/sft                             # a causal LM run: loss and perplexity, leaderboard by loss
    finetune-eval runs/sft/checkpoints/step_000200 data.validation=held_out.jsonl eval.num_generations=50
    finetune-eval runs/sft/final data.validation=qa.jsonl data.format=prompt_completion data.max_length=2048
    accelerate launch -m finetune.scoring runs/classify   # several processes: each example scored once

The kind of model is read from its config.json (`architectures`: *ForCausalLM is a causal LM, as is a model
type of AutoModelForCausalLM when no architecture is named) or from the run's config.yaml:

- classifiers (recipes/classify.py) by accuracy, F1 (regression: pearson, spearman, mse) and loss;
- causal LMs (recipes/sft.py) by loss per target token and perplexity, summed over every target token once
  (the tokens training puts loss on: data.train_on_prompt and the rest of the run's data keys), and with
  eval.num_generations=N by exact_match of greedy generations for the first N prompts.

Models are scored in fp32 by the code training evaluates with (finetune.classify.evaluate.predict,
finetune.lm.evaluate.evaluate_lm): a final/ scores as the run's eval_results.json reports (up to the
rounding of mixed precision, when the run trained under it).

Data keys are the recipe's (`data.*`); without overrides the run's own validation data is used, read from
the run's saved config.yaml (a path given on the command line, such as data.validation, overrides it). Writes,
per model: eval_results.json, and for a classifier predictions.jsonl, per_class.csv and confusion_matrix.png,
for a causal LM generations.jsonl (with eval.num_generations > 0); for a run, a leaderboard (leaderboard.csv /
.json) sorted by `eval.metric_for_best` (a causal LM's default: the run's choice, else loss; lower is better).
Results go to <given path>/eval (for a run: one sub-dir per model), or output.dir. A model dir may be a full
model (config.json + weights) or a peft adapter (adapter_config.json + adapter_model.safetensors, as a LoRA
run's checkpoints hold), loaded on its base model: the adapter's base_model_name_or_path or the run's
model.name_or_path, or model.name_or_path=... given here. The adapters of a model.random_init run cannot be
scored: their base weights were never saved (its final/ holds the merged model and can be).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, regression_labels, tokenize
from finetune.classify.evaluate import Predictions, classification_metrics, predict
from finetune.classify.model import head_config
from finetune.core.config import COMMAND_LINE, build_config, describe_type, option, parse_argv, read_yaml, schema_keys
from finetune.core.data import is_hub_dataset, make_dataloader, read_source, read_validation
from finetune.core.errors import UserError, exit_on_user_error, first_line, is_rank_zero
from finetune.core.metric_names import LOWER_IS_BETTER, available_metrics, check_metric_names, default_metrics
from finetune.core.modeling import load_causal_lm, load_tokenizer
from finetune.core.paths import local_path, looks_like_path
from finetune.core.run_dir import write_json
from finetune.core.schemas import DataConfig, SFTDataConfig, SFTModelConfig
from finetune.lm.collate import SFTCollator
from finetune.lm.data import (
    check_chat_template,
    data_format,
    load_sft_data,
    normalise,
    resolve_format,
)
from finetune.lm.evaluate import evaluate_lm, generate_greedy, score_generations, write_generations
from finetune.lm.loss import enable_chunked_loss, next_token_loss
from finetune.lm.packing import pack_examples
from finetune.lm.packing_support import check_packing_supported
from finetune.lm.tokenize import generation_prompts, tokenize_sft

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class ScoreEvalConfig:
    """What to compute."""

    batch_size: int = option(64, "examples per process per batch", ge=1)
    metrics: list[str] | None = option(
        None,
        "offline evaluate metrics (see finetune.classify.metrics); null = the model's task: accuracy, f1_macro "
        "(regression: pearson, spearman, mse)",
    )
    metric_for_best: str | None = option(None, "metric that orders the leaderboard of a run; null = the first metric")


@dataclass
class ScoreOutputConfig:
    """Where results go."""

    dir: str | None = option(None, "results dir; null = <given path>/eval (for a run: one sub-dir per model)")


@dataclass
class ScoreConfig:
    """Config of finetune-eval."""

    data: DataConfig = field(default_factory=DataConfig)
    eval: ScoreEvalConfig = field(default_factory=ScoreEvalConfig)
    output: ScoreOutputConfig = field(default_factory=ScoreOutputConfig)

    def check(self) -> list[str]:
        if self.eval.metrics is None:
            return []  # resolved per model by its task, then checked (metrics_for)
        unknown = [m for m in self.eval.metrics if m not in available_metrics()]
        if unknown:
            return [f"eval.metrics: unknown metric(s) {unknown}; offline metrics are {', '.join(available_metrics())}"]
        if self.eval.metric_for_best not in [None, *self.eval.metrics, "loss"]:
            return [f"eval.metric_for_best={self.eval.metric_for_best!r} must be one of eval.metrics or loss"]
        return []

    def metrics_for(self, regression: bool) -> tuple[list[str], str]:
        """(metrics, metric for best) for a regression or classification model: eval.* or the task's defaults."""
        metrics = self.eval.metrics if self.eval.metrics is not None else default_metrics(regression)
        check_metric_names(metrics, regression)
        best = self.eval.metric_for_best or metrics[0]
        if best not in [*metrics, "loss"]:
            raise UserError(f"eval.metric_for_best={best!r} must be one of the metrics {metrics} or loss.")
        return metrics, best


@dataclass
class ModelToScore:
    name: str  # "final", "step_000100"
    path: Path  # a dir save_pretrained wrote: a transformers model or a peft adapter
    step: int | None


def is_full_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def is_adapter_dir(path: Path) -> bool:
    """A peft adapter (a LoRA run's checkpoint): adapter config and weights, the base model named inside."""
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def is_model_dir(path: Path) -> bool:
    return is_full_model_dir(path) or is_adapter_dir(path)


def find_models(path: Path) -> tuple[list[ModelToScore], Path | None]:
    """The models `path` names, in step order, and the run dir they belong to (if any)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory.")
    if is_model_dir(path):
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return [ModelToScore(path.name, path, None)], run_dir
    if is_model_dir(path / "model"):  # a training checkpoint: checkpoints/step_N/model
        step = int(path.name.rsplit("_", 1)[-1]) if path.name.startswith("step_") else None
        run_dir = path.parents[1] if (path.parents[1] / "config.yaml").is_file() else None
        return [ModelToScore(path.name, path / "model", step)], run_dir
    if (path / "config.yaml").is_file():  # a run's output dir
        checkpoints = sorted((path / "checkpoints").glob("step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
        models = [
            ModelToScore(c.name, c / "model", int(c.name.rsplit("_", 1)[-1]))
            for c in checkpoints
            if is_model_dir(c / "model")
        ]
        if is_model_dir(path / "final"):
            results = path / "eval_results.json"
            step = json.loads(results.read_text()).get("step") if results.is_file() else None
            models.append(ModelToScore("final", path / "final", step))
        if models:
            return models, path
        raise UserError(f"{path} is a run dir (config.yaml) but holds no finished model: no final/ and no checkpoints.")
    raise UserError(
        f"{path} is not a model, a checkpoint or a run: expected config.json and model.safetensors inside "
        f"(an exported model such as final/) or {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a peft adapter), "
        "a model/ sub-dir (a checkpoint), or config.yaml (a run's output dir)."
    )


def load_config_for(run_dir: Path | None, overrides: list[tuple[str, str]]) -> ScoreConfig:
    """Defaults < the run's saved data and eval keys < the command line."""
    sources = []
    if run_dir is not None:
        saved = read_yaml(run_dir / "config.yaml")
        eval_saved = {k: v for k, v in saved.get("eval", {}).items() if k in ("metrics", "metric_for_best")}
        sources.append((str(run_dir / "config.yaml"), {"data": saved.get("data", {}), "eval": eval_saved}))
    sources.append((COMMAND_LINE, dict(overrides)))
    return build_config(ScoreConfig, sources)


def read_head(path: Path, data: DataConfig) -> dict:
    """num_labels, id2label, label2id and problem_type of the model in `path`, without loading weights.

    An adapter dir without config.json (what peft saves) gives its number of outputs by the shape of its
    head; a 1-output head is a regression head, and a classifier's label names are rebuilt from the
    training data, as the recipe built them."""
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        id2label = {int(k): v for k, v in config.id2label.items()}
        return {
            "num_labels": config.num_labels,
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
            "problem_type": config.problem_type,
        }
    outputs = adapter_head_outputs(path)
    if outputs == 1:
        return head_config([], "regression")
    names = load_classification_data(replace(data, task="classification")).label_names
    if len(names) != outputs:
        raise UserError(
            f"{path}: the adapter's head has {outputs} outputs but data.train ({data.train}) has {len(names)} "
            f"labels ({', '.join(names)}). Score it with the run's own data, or save config.json beside the adapter."
        )
    return head_config(names)


def adapter_head_outputs(path: Path) -> int:
    """Outputs of the classification head a peft adapter saves (its modules_to_save): the fewest rows
    of its weight matrices (a one-layer head has one; RoBERTa's dense + out_proj head, out_proj's)."""
    head_modules = json.loads((path / ADAPTER_CONFIG).read_text()).get("modules_to_save") or []
    with safe_open(path / ADAPTER_WEIGHTS, "pt") as weights:
        rows = [
            weights.get_slice(key).get_shape()[0]
            for key in weights.keys()
            if key.endswith(".weight")
            and len(weights.get_slice(key).get_shape()) == 2
            and any(f".{module}." in f".{key}" for module in head_modules)
        ]
    if not rows:
        raise UserError(
            f"{path}: the adapter holds no classification head (modules_to_save: {head_modules}); "
            "train the adapter with task_type SEQ_CLS so that the head is saved with it."
        )
    return min(rows)


def is_regression_head(head: dict) -> bool:
    return head["problem_type"] == "regression" or head["num_labels"] == 1


def load_model(path: Path, head: dict):
    """(tokenizer, model) of a full model dir, or of a peft adapter on its base model with `head`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if is_full_model_dir(path):
            # fp32 as training loads it: a half-precision checkpoint would otherwise be scored in its stored dtype
            return tokenizer, AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        # The base model is loaded explicitly: transformers would look for base weights in `path` itself
        # once a config.json lies beside the adapter.
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # not the base's "classifier newly initialized": the adapter holds it
        try:
            model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, **head)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.load_adapter(str(path))
        return tokenizer, model
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: could not load the model: {first_line(err)}") from None


def load_examples(
    data: DataConfig, label2id: dict[str, int], regression: bool
) -> tuple[list[str], list[str] | None, list[int] | list[float] | None]:
    """(texts, text pairs, labels) of the data to score: label ids, float scores for a regression model, or
    None for a file without labels.

    Without data.validation the training run's own validation split is rebuilt (same seed)."""
    if data.validation is None:
        split = load_classification_data(replace(data, task="regression" if regression else "classification"))
        ds = split.validation
        labels = list(ds["label"]) if regression else [split.label_names[i] for i in ds["label"]]
    else:
        ds = read_labelled_file(data)
        if "label" not in ds.column_names:
            labels = None
        elif regression:
            ds = regression_labels(ds, f"data.validation ({data.validation})", data.label_column)
            labels = list(ds["label"])
        else:
            labels = [str(v) for v in ds["label"]]
    pairs = ds["text_pair"] if "text_pair" in ds.column_names else None
    if labels is None or regression:
        return ds["text"], pairs, labels
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise UserError(
            f"the data's labels {unknown[:10]} are not labels of the model ({', '.join(label2id)}). "
            "Score the model on data of its own task, or set data.label_column to the right column."
        )
    return ds["text"], pairs, [label2id[n] for n in labels]


def read_labelled_file(data: DataConfig) -> Dataset:
    """data.validation's columns renamed to text (, text_pair) (, label when the file has one)."""
    ds = read_source(data.validation, "data.validation")
    missing = [c for c in (data.text_column, data.text_pair_column) if c and c not in ds.column_names]
    if missing:
        raise UserError(
            f"data.validation ({data.validation}): column(s) {missing} not found; the columns are: "
            f"{', '.join(ds.column_names)}. Set data.text_column / data.text_pair_column."
        )
    rename = {data.text_column: "text", **({data.text_pair_column: "text_pair"} if data.text_pair_column else {})}
    if data.label_column in ds.column_names:
        rename[data.label_column] = "label"
    return ds.select_columns(list(rename)).rename_columns({k: v for k, v in rename.items() if k != v})


def fingerprint(texts: list[str], labels: list[int] | list[float] | None) -> str:
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        digest.update(text.encode())
        digest.update(str(labels[i] if labels else "").encode())
    return digest.hexdigest()[:16]


def score_model(accelerator, model_info: ModelToScore, cfg: ScoreConfig, out_dir: Path) -> dict | None:
    """Predict with one model on every process; the main process writes its files and returns its metrics."""
    head = read_head(model_info.path, cfg.data)
    regression = is_regression_head(head)
    metrics, _ = cfg.metrics_for(regression)
    tokenizer, model = load_model(model_info.path, head)
    texts, pairs, labels = load_examples(cfg.data, head["label2id"], regression)
    gold = labels if labels is not None else [-100] * len(texts)  # -100: no label, predictions only
    columns = {"text": texts, **({"text_pair": pairs} if pairs else {}), "label": gold}
    max_length = min(tokenizer.model_max_length, 10**6)  # final/ saves the training max_length here
    dataset = tokenize(Dataset.from_dict(columns), tokenizer, max_length)
    # Inference needs no DDP wrapper: the model is only placed; the loader is sharded over processes.
    model = model.to(accelerator.device)
    loader = accelerator.prepare(make_dataloader(dataset, cfg.eval.batch_size, padding_collator(tokenizer)))
    predictions = predict(accelerator, model, loader)
    accelerator.free_memory()  # drop Accelerate's reference to this loader before the next model
    if not accelerator.is_main_process:
        return None
    assert len(predictions.labels) == len(texts), "every example is scored exactly once"
    out_dir.mkdir(parents=True, exist_ok=True)
    if regression:
        rows = regression_rows(texts, labels, predictions)
    else:
        rows = classification_rows(texts, labels, predictions, head["id2label"])
    with (out_dir / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    results = {
        "model_path": str(model_info.path),
        "step": model_info.step,
        "num_examples": len(texts),
        "data_fingerprint": fingerprint(texts, labels),
    }
    if labels is not None:
        results.update(classification_metrics(predictions, metrics))
        if not regression:  # a score has no classes to tabulate
            write_per_class(out_dir, predictions.labels, predictions.logits.argmax(-1), head["id2label"])
    write_json(out_dir / "eval_results.json", results)
    return results


def classification_rows(
    texts: list[str], labels: list[int] | None, predictions: Predictions, id2label: dict[int, str]
) -> list[dict]:
    """predictions.jsonl rows of a classifier: gold and predicted label names, and every class's probability."""
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), -1).numpy()
    predicted = predictions.logits.argmax(-1)
    return [
        {
            "text": text,
            "gold": id2label[labels[i]] if labels else None,
            "predicted": id2label[int(predicted[i])],
            "probabilities": {id2label[c]: round(float(p), 6) for c, p in enumerate(probabilities[i])},
        }
        for i, text in enumerate(texts)
    ]


def regression_rows(texts: list[str], labels: list[float] | None, predictions: Predictions) -> list[dict]:
    """predictions.jsonl rows of a regression model: gold and predicted scores."""
    return [
        {"text": text, "gold": labels[i] if labels else None, "predicted": float(predictions.logits[i, 0])}
        for i, text in enumerate(texts)
    ]


def write_per_class(out_dir: Path, gold: np.ndarray, predicted: np.ndarray, id2label: dict[int, str]) -> None:
    """Per-class precision/recall/F1 (CSV) and the confusion matrix (PNG), by scikit-learn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_fscore_support

    ids = sorted(id2label)
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    with (out_dir / "per_class.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "precision", "recall", "f1", "support"])
        for i, label_id in enumerate(ids):
            writer.writerow(
                [id2label[label_id], f"{precision[i]:.4f}", f"{recall[i]:.4f}", f"{f1[i]:.4f}", int(support[i])]
            )
    display = ConfusionMatrixDisplay.from_predictions(
        gold, predicted, labels=ids, display_labels=[id2label[i] for i in ids], xticks_rotation=45, colorbar=False
    )
    display.figure_.tight_layout()
    display.figure_.savefig(out_dir / "confusion_matrix.png", dpi=100)
    plt.close(display.figure_)


# --------------------------------------------------------------------------------------------
# Causal language models (recipes/sft.py)
# --------------------------------------------------------------------------------------------

CAUSAL_LM, CLASSIFIER = "causal_lm", "classifier"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
BASE_WEIGHT_FILES = (*WEIGHT_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ScoreLMModelConfig:
    """How a causal LM loads; a run's model.* keys by default."""

    name_or_path: str | None = option(
        None,
        "base model of a LoRA adapter; null = the adapter's base_model_name_or_path (or the run's model.name_or_path "
        "when that one is not a local dir)",
    )
    revision: str | None = option(None, "Hub revision of the base model of an adapter")
    trust_remote_code: bool = option(False, "run model code shipped with a Hub model; only for code you trust")
    random_init: bool = option(
        False, "the run built its base model with random weights, never saved: its LoRA adapters cannot be scored"
    )
    attn_implementation: str | None = option(None, "sdpa, eager, flash_attention_2, ...; null = transformers' default")


@dataclass
class ScoreLMEvalConfig:
    """What to compute for a causal LM."""

    batch_size: int = option(16, "examples (or packed rows) per process per batch; a run's eval.batch_size", ge=1)
    num_generations: int = option(
        0,
        "greedy generations for the first N prompts, scored by exact_match and written to generations.jsonl; 0 = none",
        ge=0,
    )
    max_new_tokens: int = option(64, "longest generation, in tokens; a run's eval.max_new_tokens", ge=1)
    metric_for_best: Literal["loss", "perplexity", "exact_match"] | None = option(
        None,
        "metric that orders the leaderboard of a run; null = the run's eval.metric_for_best (exact_match only with "
        "eval.num_generations > 0), else loss",
    )
    chunked_loss: bool = option(
        True,
        "the loss from the hidden states chunk by chunk, without (tokens x vocabulary) logits: the same loss, less "
        "memory; a run's train.chunked_loss",
    )


@dataclass
class ScoreLMConfig:
    """Config of finetune-eval for causal LMs."""

    model: ScoreLMModelConfig = field(default_factory=ScoreLMModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    eval: ScoreLMEvalConfig = field(default_factory=ScoreLMEvalConfig)
    output: ScoreOutputConfig = field(default_factory=ScoreOutputConfig)

    def check(self) -> list[str]:
        problems = []
        if self.eval.metric_for_best == "exact_match" and self.eval.num_generations == 0:
            problems.append("eval.metric_for_best=exact_match needs generations: set eval.num_generations > 0")
        if self.data.format == "text" and (self.eval.num_generations or self.eval.metric_for_best == "exact_match"):
            problems.append("eval.num_generations / exact_match need prompts: data.format=text has none")
        return problems


def is_causal_lm_architecture(name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    return name.endswith("ForCausalLM") or name in names


def is_sft_config(saved: dict) -> bool:
    """A run's config.yaml written by recipes/sft.py (its data and train keys are the SFT recipe's)."""
    data, train = saved.get("data") or {}, saved.get("train") or {}
    return "format" in data or "train_on_prompt" in data or "chunked_loss" in train


def model_kind(path: Path, saved: dict | None) -> str:
    """CAUSAL_LM or CLASSIFIER: by the architectures of the model's config.json, else by the run's config.yaml,
    else by the adapter's peft task type, else by the config's model_type (a model type of AutoModelForCausalLM)."""
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    architectures = config.get("architectures") or []
    if architectures:
        return CAUSAL_LM if any(is_causal_lm_architecture(a) for a in architectures) else CLASSIFIER
    if saved is not None:
        return CAUSAL_LM if is_sft_config(saved) else CLASSIFIER
    if (path / ADAPTER_CONFIG).is_file():
        task_type = json.loads((path / ADAPTER_CONFIG).read_text()).get("task_type")
        if task_type in ("CAUSAL_LM", "SEQ_CLS"):
            return CAUSAL_LM if task_type == "CAUSAL_LM" else CLASSIFIER
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return CAUSAL_LM if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else CLASSIFIER


def _known(mapping: dict | None, schema: type) -> dict:
    """The entries of a saved config group that `schema` has (a config.yaml of another version may hold more)."""
    keys = {f.name for f in fields(schema)}
    return {k: v for k, v in (mapping or {}).items() if k in keys}


def load_lm_config(run_dir: Path | None, saved: dict | None, overrides: list[tuple[str, str]]) -> ScoreLMConfig:
    """Defaults < the run's model, data and evaluation keys < the command line."""
    sources = []
    if saved is not None:
        eval_saved = {k: v for k, v in (saved.get("eval") or {}).items() if k in ("batch_size", "max_new_tokens")}
        if "chunked_loss" in (saved.get("train") or {}):
            eval_saved["chunked_loss"] = saved["train"]["chunked_loss"]
        run = {
            "model": _known(saved.get("model"), ScoreLMModelConfig),
            "data": _known(saved.get("data"), SFTDataConfig),
            "eval": eval_saved,
        }
        sources.append((str(run_dir / "config.yaml"), run))
    sources.append((COMMAND_LINE, dict(overrides)))
    return build_config(ScoreLMConfig, sources)


def lm_metric_for_best(cfg: ScoreLMConfig, saved: dict | None) -> str:
    """eval.metric_for_best, else the run's (exact_match only when generations are asked for), else loss."""
    if cfg.eval.metric_for_best:
        return cfg.eval.metric_for_best
    run_choice = ((saved or {}).get("eval") or {}).get("metric_for_best")
    if run_choice in ("loss", "perplexity") or (run_choice == "exact_match" and cfg.eval.num_generations):
        return run_choice
    return "loss"


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


def load_lm(path: Path, cfg: ScoreLMConfig, base_given: bool):
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
    model = load_causal_lm(base_cfg, tokenizer, torch.float32)
    try:
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
    tokenizer, model = load_lm(model_info.path, cfg, base_given)
    fmt = data_format(examples)
    check_chat_template(cfg.data, tokenizer, fmt)
    check_lm_max_length(cfg.data.max_length, model.config)
    dataset, report = tokenize_sft(examples, tokenizer, cfg.data)
    if len(dataset) == 0:
        raise UserError(f"no example left to score: {report.describe()}. Check data.max_length and the data.")
    data_fingerprint = token_fingerprint(dataset)
    flatten = cfg.data.packing and (cfg.model.attn_implementation or "").startswith("flash_attention")
    if cfg.data.packing:
        check_packing_supported(model)
        dataset = pack_examples(dataset, cfg.data.max_length)
    if cfg.eval.chunked_loss:
        try:
            enable_chunked_loss(model)
        except UserError:  # a model whose logits the chunked loss cannot reproduce: the plain loss is the same
            pass
    model = model.to(accelerator.device)  # no DDP wrapper: nothing trains; the batches are split over processes
    loader = make_dataloader(dataset, cfg.eval.batch_size, SFTCollator.for_tokenizer(tokenizer, flatten=flatten))
    metrics = evaluate_lm(accelerator, model, loader, next_token_loss, on_nonfinite="warn")
    prompts = generation_prompts(examples, tokenizer, cfg.eval.num_generations)
    completions = generate_greedy(accelerator, model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    metrics.update(score_generations(prompts, completions))
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
        "num_examples": report.kept,
        "data": report.describe(),
        "data_fingerprint": data_fingerprint,
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


def score_causal_lms(
    path: Path, models: list[ModelToScore], run_dir: Path | None, saved: dict | None, overrides: list
) -> None:
    """finetune-eval for causal LMs: every model on the same examples; a leaderboard for a run."""
    cfg = load_lm_config(run_dir, saved, overrides)
    given = {key for key, _ in overrides}
    base_given = "model.name_or_path" in given and bool(cfg.model.name_or_path)
    models = scorable_lms(models, cfg, base_given)
    metric_for_best = lm_metric_for_best(cfg, saved)
    if run_dir is None and "data.max_length" not in given:  # an exported model: its tokenizer holds training's
        cfg = replace(cfg, data=replace(cfg.data, max_length=saved_max_length(models[0].path, cfg.data.max_length)))
    examples = load_lm_examples(cfg.data, have_source=run_dir is not None or "data.train" in given)
    scored_a_run = run_dir is not None and path.resolve() == run_dir.resolve()
    base = Path(cfg.output.dir) if cfg.output.dir else path / "eval"
    shown = ("loss", "perplexity", "tokens", "exact_match")

    accelerator = Accelerator()
    rows = []
    for model_info in models:
        out_dir = base / model_info.name if scored_a_run else base
        results = score_causal_lm(accelerator, model_info, cfg, examples, out_dir, base_given)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            print(f"{model_info.name}: " + format_scores(results, shown))
    if accelerator.is_main_process and scored_a_run and rows:
        keys = ["model", "step", *(k for k in shown if k in rows[0]), "best"]
        write_leaderboard(base, rows, metric_for_best, keys)
    accelerator.end_training()


def leaderboard(rows: list[dict], metric: str) -> list[dict]:
    """Rows sorted best first by `metric`, NaN last (the correlation of a model that predicts a constant); the
    best marked."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    ranked = sorted(rows, key=lambda r: (math.isnan(r[metric]), sign * r[metric]))
    for i, row in enumerate(ranked):
        row["best"] = i == 0
    return ranked


def write_leaderboard(base: Path, rows: list[dict], metric: str, keys: list[str]) -> None:
    """leaderboard.json / .csv of a run's models, best first by `metric`, and the table on stdout."""
    ranked = leaderboard(rows, metric)
    write_json(base / "leaderboard.json", ranked)
    with (base / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)
    print(f"\nleaderboard by {metric} ({base / 'leaderboard.csv'}):")
    print(" | ".join(keys))
    for row in ranked:
        print(
            " | ".join(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys)
            + (" *" if row["best"] else "")
        )


def format_scores(results: dict, keys) -> str:
    shown = {k: results[k] for k in keys if k in results}
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def usage() -> str:
    """--help: the module doc and the keys of each kind of model (data.* keys are the recipe's)."""
    lines = [(__doc__ or "").rstrip(), "", "Keys (key=value) besides the recipe's data.* keys:"]
    for title, schema in (("classifier", ScoreConfig), ("causal LM", ScoreLMConfig)):
        lines += ["", f"{title}:"]
        for key in schema_keys(schema).values():
            if key.dotted.startswith("data."):
                continue
            default = "null" if key.default is None else key.default
            lines.append(f"  {key.dotted}  ({describe_type(key.type)}, default: {default})")
            lines.append(f"      {key.help}")
    lines += [
        "",
        "data.*: classifier keys as `accelerate launch recipes/classify.py --help` lists them, causal LM keys as "
        "`accelerate launch recipes/sft.py --help` does.",
    ]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # one bar per model loaded would drown the scores
    path, rest = Path(argv[0]), argv[1:]
    if path.is_symlink():  # checkpoints/best: score (and name) the checkpoint it points to
        path = path.resolve()
    models, run_dir = find_models(path)
    overrides = parse_argv(rest).overrides
    saved = read_yaml(run_dir / "config.yaml") if run_dir is not None else None
    if model_kind(models[0].path, saved) == "causal_lm":
        score_causal_lms(path, models, run_dir, saved, overrides)
        return
    cfg = load_config_for(run_dir, overrides)
    # The models of a run share one head: its task picks the default metrics and the leaderboard's.
    metrics, metric_for_best = cfg.metrics_for(is_regression_head(read_head(models[0].path, cfg.data)))
    scored_a_run = run_dir is not None and path.resolve() == run_dir.resolve()
    base = Path(cfg.output.dir) if cfg.output.dir else path / "eval"

    accelerator = Accelerator()
    rows = []
    for model_info in models:
        out_dir = base / model_info.name if scored_a_run else base
        results = score_model(accelerator, model_info, cfg, out_dir)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            print(f"{model_info.name}: " + format_scores(results, (*metrics, "num_examples")))
    if accelerator.is_main_process and scored_a_run and rows and metric_for_best in rows[0]:
        write_leaderboard(base, rows, metric_for_best, ["model", "step", *metrics, "loss", "best"])
    accelerator.end_training()


if __name__ == "__main__":
    main()
