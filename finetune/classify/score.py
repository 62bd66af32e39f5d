"""finetune-eval for classifiers (recipes/classify.py): accuracy, F1 (regression: pearson, spearman, mse) and loss
of each model, by the code training evaluates with (`finetune.classify.evaluate.predict`), in fp32; per model
eval_results.json, predictions.jsonl, per_class.csv and confusion_matrix.png.

A LoRA adapter's head (its labels) is read from the config.json saved beside it; an adapter dir without one (as
peft alone saves it, and runs from before config.json was saved beside final/adapter/) gives its number of outputs
by the shape of its head, and its label names are rebuilt from the run's training data."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

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
from finetune.core import quantization
from finetune.core.config import COMMAND_LINE, build_config, read_yaml
from finetune.core.data import make_dataloader, read_source
from finetune.core.errors import UserError, first_line
from finetune.core.modeling import build_skeleton, skip_unquantized
from finetune.core.run_dir import write_json
from finetune.core.saved_models import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ModelToScore,
    ScoredModels,
    format_scores,
    is_full_model_dir,
    is_whole_run,
    results_dir,
)
from finetune.core.schemas import DataConfig, ScoreConfig


def score_classifiers(
    path: Path, models: list[ModelToScore], run_dir: Path | None, overrides: list[tuple[str, str]]
) -> ScoredModels:
    """finetune-eval for classifiers: every model on the same examples, a line on stdout each."""
    cfg = load_config_for(run_dir, overrides)
    # The models of a run share one head: its task picks the default metrics and the leaderboard's.
    regression = is_regression_head(read_head(models[0].path, cfg.data))
    metrics, metric_for_best = cfg.resolved_metrics(regression), cfg.metric_for_best(regression)
    whole_run = is_whole_run(path, run_dir)
    base = results_dir(path, cfg.output.dir)

    accelerator = Accelerator()
    rows = []
    for model_info in models:
        results = score_model(accelerator, model_info, cfg, base / model_info.name if whole_run else base)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            print(f"{model_info.name}: " + format_scores(results, (*metrics, "num_examples")))
    accelerator.end_training()
    return ScoredModels(rows, metric_for_best, ["model", "step", *metrics, "loss", "best"], base)


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

    A full model, and an adapter as the recipes save it (`finetune.core.modeling.write_model`), name the head in
    config.json. An adapter dir without one (peft's own save_pretrained, or a run's final/adapter/ saved before
    config.json was) gives its number of outputs by the shape of its head; a 1-output head is a regression head,
    and a classifier's label names are rebuilt from the training data, as the recipe built them."""
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


def load_model(path: Path, head: dict, device="cpu"):
    """(tokenizer, model) of a full model dir, or of a peft adapter on its base model with `head` (quantized as it
    was trained, on `device`: `quantization.adapter_base_loading`)."""
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
        loading = {"dtype": torch.float32, **quantization.adapter_base_loading(path, device)}
        if "quantization_config" in loading:
            config = AutoConfig.from_pretrained(base, **head)
            skip_unquantized(loading, build_skeleton(config, AutoModelForSequenceClassification))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(base, **loading, **head)
            quantization.keep_training_numerics(model)
        finally:
            hf_logging.set_verbosity(verbosity)
        quantization.quiet_bitsandbytes()  # before peft imports it
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
    metrics = cfg.resolved_metrics(regression)
    tokenizer, model = load_model(model_info.path, head, accelerator.device)
    texts, pairs, labels = load_examples(cfg.data, head["label2id"], regression)
    gold = labels if labels is not None else [-100] * len(texts)  # -100: no label, predictions only
    columns = {"text": texts, **({"text_pair": pairs} if pairs else {}), "label": gold}
    max_length = min(tokenizer.model_max_length, 10**6)  # final/ saves the training max_length here
    dataset = tokenize(Dataset.from_dict(columns), tokenizer, max_length)
    # Inference needs no DDP wrapper: the model is only placed; the loader is sharded over processes.
    if not quantization.is_quantized(model):  # a quantized base was loaded onto the device
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
