"""finetune-eval: score an exported model, a training checkpoint, or every model of a run.

    finetune-eval runs/classify                        # every checkpoint and final/, on the run's validation data
    finetune-eval runs/classify/final data.validation=other.csv data.text_column=sentence
    accelerate launch -m finetune.scoring runs/classify   # several processes: each example scored once

Data keys are the recipe's (`data.*`); without overrides the run's own validation data is used, read from
the run's saved config.yaml. Writes, per model: eval_results.json, predictions.jsonl, and for a classifier
per_class.csv and confusion_matrix.png; for a run, a leaderboard (leaderboard.csv / .json) sorted by
`eval.metric_for_best`. A model dir may be a full model (config.json + weights) or a peft adapter
(adapter_config.json + adapter_model.safetensors, as a LoRA run's checkpoints hold).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from finetune.config import COMMAND_LINE, build_config, option, parse_argv, read_yaml
from finetune.classification import (
    head_config,
    load_classification_data,
    padding_collator,
    regression_labels,
    tokenize,
)
from finetune.data import make_dataloader, read_source
from finetune.errors import UserError, exit_on_user_error, first_line
from finetune.evaluation import Predictions, classification_metrics, predict
from finetune.metrics import LOWER_IS_BETTER, available_metrics, check_metric_names, default_metrics
from finetune.recipe_configs import DataConfig
from finetune.runs import write_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class ScoreEvalConfig:
    """What to compute."""

    batch_size: int = option(64, "examples per process per batch", ge=1)
    metrics: list[str] | None = option(
        None,
        "offline evaluate metrics (see finetune.metrics); null = the model's task: accuracy, f1_macro "
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


def leaderboard(rows: list[dict], metric: str) -> list[dict]:
    """Rows sorted best first by `metric`, NaN last (the correlation of a model that predicts a constant); the
    best marked."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    ranked = sorted(rows, key=lambda r: (math.isnan(r[metric]), sign * r[metric]))
    for i, row in enumerate(ranked):
        row["best"] = i == 0
    return ranked


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # one bar per model loaded would drown the scores
    path, rest = Path(argv[0]), argv[1:]
    if path.is_symlink():  # checkpoints/best: score (and name) the checkpoint it points to
        path = path.resolve()
    models, run_dir = find_models(path)
    cfg = load_config_for(run_dir, parse_argv(rest).overrides)
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
            shown = {k: results[k] for k in (*metrics, "num_examples") if k in results}
            print(
                f"{model_info.name}: "
                + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            )
    if accelerator.is_main_process and scored_a_run and rows and metric_for_best in rows[0]:
        ranked = leaderboard(rows, metric_for_best)
        write_json(base / "leaderboard.json", ranked)
        keys = ["model", "step", *metrics, "loss", "best"]
        with (base / "leaderboard.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ranked)
        print(f"\nleaderboard by {metric_for_best} ({base / 'leaderboard.csv'}):")
        print(" | ".join(keys))
        for row in ranked:
            print(
                " | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                + (" *" if row["best"] else "")
            )
    accelerator.end_training()


if __name__ == "__main__":
    main()
