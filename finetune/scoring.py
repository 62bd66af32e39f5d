"""finetune-eval: score an exported model, a training checkpoint, or every model of a run.

    finetune-eval runs/classify                        # every checkpoint and final/, on the run's validation data
    finetune-eval runs/classify/final data.validation=other.csv data.text_column=sentence
    accelerate launch -m finetune.scoring runs/classify   # several processes: each example scored once

Data keys are the recipe's (`data.*`); without overrides the run's own validation data is used, read from
the run's saved config.yaml. Writes, per model: eval_results.json, predictions.jsonl, per_class.csv and
confusion_matrix.png; for a run, a leaderboard (leaderboard.csv / .json) sorted by `eval.metric_for_best`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune.config import COMMAND_LINE, build_config, option, parse_argv, read_yaml
from finetune.data import load_classification_data, make_dataloader, read_source, tokenize
from finetune.errors import UserError, exit_on_user_error
from finetune.evaluation import classification_metrics, predict
from finetune.metrics import LOWER_IS_BETTER, available_metrics
from finetune.recipe_configs import DataConfig
from finetune.runs import write_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class ScoreEvalConfig:
    """What to compute."""

    batch_size: int = option(64, "examples per process per batch", ge=1)
    metrics: list[str] = option(["accuracy", "f1_macro"], "offline evaluate metrics (see finetune.metrics)")
    metric_for_best: str = option("accuracy", "metric that orders the leaderboard of a run")


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
        unknown = [m for m in self.eval.metrics if m not in available_metrics()]
        if unknown:
            return [f"eval.metrics: unknown metric(s) {unknown}; offline metrics are {', '.join(available_metrics())}"]
        if self.eval.metric_for_best not in [*self.eval.metrics, "loss"]:
            return [f"eval.metric_for_best={self.eval.metric_for_best!r} must be one of eval.metrics or loss"]
        return []


@dataclass
class ModelToScore:
    name: str  # "final", "step_000100"
    path: Path  # a dir save_pretrained wrote
    step: int | None


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


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
        "(an exported model such as final/), a model/ sub-dir (a checkpoint), or config.yaml (a run's output dir)."
    )


def load_config_for(run_dir: Path | None, overrides: list[tuple[str, str]]) -> ScoreConfig:
    """Defaults < the run's saved data and eval keys < the command line."""
    sources = []
    if run_dir is not None:
        saved = read_yaml(run_dir / "config.yaml")
        eval_saved = {k: v for k, v in saved.get("eval", {}).items() if k == "metrics"}
        sources.append((str(run_dir / "config.yaml"), {"data": saved.get("data", {}), "eval": eval_saved}))
    sources.append((COMMAND_LINE, dict(overrides)))
    return build_config(ScoreConfig, sources)


def load_examples(data: DataConfig, label2id: dict[str, int]) -> tuple[list[str], list[str] | None, list[int] | None]:
    """(texts, text pairs, label ids) of the data to score; label ids are None for a file without labels.

    Without data.validation the training run's own stratified split is rebuilt (same seed)."""
    if data.validation is None:
        split = load_classification_data(data)
        names = [split.label_names[i] for i in split.validation["label"]]
        ds = split.validation
    else:
        ds = read_source(data.validation, "data.validation")
        missing = [c for c in (data.text_column, data.text_pair_column) if c and c not in ds.column_names]
        if missing:
            raise UserError(
                f"data.validation ({data.validation}): column(s) {missing} not found; the columns are: "
                f"{', '.join(ds.column_names)}. Set data.text_column / data.text_pair_column."
            )
        ds = ds.rename_columns(
            {data.text_column: "text", **({data.text_pair_column: "text_pair"} if data.text_pair_column else {})}
        )
        names = [str(v) for v in ds[data.label_column]] if data.label_column in ds.column_names else None
    pairs = ds["text_pair"] if "text_pair" in ds.column_names else None
    if names is None:
        return ds["text"], pairs, None
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise UserError(
            f"the data's labels {unknown[:10]} are not labels of the model ({', '.join(label2id)}). "
            "Score the model on data of its own task, or set data.label_column to the right column."
        )
    return ds["text"], pairs, [label2id[n] for n in names]


def fingerprint(texts: list[str], labels: list[int] | None) -> str:
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        digest.update(text.encode())
        digest.update(str(labels[i] if labels else "").encode())
    return digest.hexdigest()[:16]


def score_model(accelerator, model_info: ModelToScore, cfg: ScoreConfig, out_dir: Path) -> dict | None:
    """Predict with one model on every process; the main process writes its files and returns its metrics."""

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_info.path)
        model = AutoModelForSequenceClassification.from_pretrained(model_info.path)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_info.path}: could not load the model: {str(err).splitlines()[0]}") from None
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    texts, pairs, labels = load_examples(cfg.data, {v: k for k, v in id2label.items()})
    gold = labels if labels is not None else [-100] * len(texts)  # -100: no label, predictions only
    columns = {"text": texts, **({"text_pair": pairs} if pairs else {}), "label": gold}
    max_length = min(tokenizer.model_max_length, 10**6)  # final/ saves the training max_length here
    dataset = tokenize(Dataset.from_dict(columns), tokenizer, max_length)
    # Inference needs no DDP wrapper: the model is only placed; the loader is sharded over processes.
    model = model.to(accelerator.device)
    loader = accelerator.prepare(make_dataloader(dataset, tokenizer, cfg.eval.batch_size, shuffle=False))
    predictions = predict(accelerator, model, loader)
    accelerator.free_memory()  # drop Accelerate's reference to this loader before the next model
    if not accelerator.is_main_process:
        return None
    assert len(predictions.labels) == len(texts), "every example is scored exactly once"
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), -1).numpy()
    predicted = predictions.logits.argmax(-1)
    with (out_dir / "predictions.jsonl").open("w") as f:
        for i, text in enumerate(texts):
            row = {
                "text": text,
                "gold": id2label[labels[i]] if labels else None,
                "predicted": id2label[int(predicted[i])],
            }
            row["probabilities"] = {id2label[c]: round(float(p), 6) for c, p in enumerate(probabilities[i])}
            f.write(json.dumps(row) + "\n")
    results = {
        "model_path": str(model_info.path),
        "step": model_info.step,
        "num_examples": len(texts),
        "data_fingerprint": fingerprint(texts, labels),
    }
    if labels is not None:
        results.update(classification_metrics(predictions, cfg.eval.metrics))
        write_per_class(out_dir, predictions.labels, predicted, id2label)
    write_json(out_dir / "eval_results.json", results)
    return results


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
    """Rows sorted best first by `metric`; the best marked."""
    reverse = metric not in LOWER_IS_BETTER
    ranked = sorted(rows, key=lambda r: r[metric], reverse=reverse)
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
    path, rest = Path(argv[0]), argv[1:]
    models, run_dir = find_models(path)
    cfg = load_config_for(run_dir, parse_argv(rest).overrides)
    scored_a_run = run_dir is not None and path.resolve() == run_dir.resolve()
    base = Path(cfg.output.dir) if cfg.output.dir else path / "eval"

    accelerator = Accelerator()
    rows = []
    for model_info in models:
        out_dir = base / model_info.name if scored_a_run else base
        results = score_model(accelerator, model_info, cfg, out_dir)
        if results is not None:
            rows.append({"model": model_info.name, **results})
            shown = {k: results[k] for k in (*cfg.eval.metrics, "num_examples") if k in results}
            print(
                f"{model_info.name}: "
                + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            )
    if accelerator.is_main_process and scored_a_run and rows and cfg.eval.metric_for_best in rows[0]:
        ranked = leaderboard(rows, cfg.eval.metric_for_best)
        write_json(base / "leaderboard.json", ranked)
        keys = ["model", "step", *cfg.eval.metrics, "loss", "best"]
        with (base / "leaderboard.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ranked)
        print(f"\nleaderboard by {cfg.eval.metric_for_best} ({base / 'leaderboard.csv'}):")
        print(" | ".join(keys))
        for row in ranked:
            print(
                " | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                + (" *" if row["best"] else "")
            )
    accelerator.end_training()


if __name__ == "__main__":
    main()
