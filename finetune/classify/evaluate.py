"""Scoring a classifier or regression head: predictions gathered from every process, each example counted once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from finetune.core.errors import UserError
from finetune.training.run import Run


@dataclass
class Predictions:
    """Logits and gold labels of a whole evaluation set, in dataset order."""

    logits: np.ndarray  # (examples, classes), or (examples, 1) for a regression head
    labels: np.ndarray  # (examples,): class ids, or float scores


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, dataloader) -> Predictions:
    """Run `model` over a prepared dataloader; `gather_for_metrics` drops the samples that
    Accelerate repeats to even out the last batch across processes."""
    was_training = model.training
    model.eval()
    logits_parts, label_parts = [], []
    for batch in dataloader:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        logits_parts.append(logits.cpu())
        label_parts.append(labels.cpu())
    model.train(was_training)
    return Predictions(torch.cat(logits_parts).numpy(), torch.cat(label_parts).numpy())


def is_regression(predictions: Predictions) -> bool:
    """A regression head: one output per example and float gold scores (class ids are ints)."""
    return predictions.logits.shape[-1] == 1 and np.issubdtype(predictions.labels.dtype, np.floating)


def classification_metrics(
    predictions: Predictions, names: tuple[str, ...] | list[str] = ("accuracy", "f1_macro")
) -> dict[str, float]:
    """The metrics `names` (offline `evaluate` modules, see finetune.classify.metrics), the mean loss the model
    trains on (cross-entropy, or squared error for a regression head) and the number of examples scored."""
    if is_regression(predictions):
        predicted = predictions.logits[:, 0]
        errors = predicted.astype(np.float64) - predictions.labels.astype(np.float64)
        loss = float(np.mean(errors**2))
    else:
        predicted = predictions.logits.argmax(-1)
        logits = torch.from_numpy(predictions.logits)
        labels = torch.from_numpy(predictions.labels).long()
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
    from finetune.classify.metrics import load_metric  # evaluate, seconds to import: not before the first evaluation

    results = {}
    for name in names:
        metric = load_metric(name)
        (results[name],) = metric.compute(predictions=predicted, references=predictions.labels).values()
    results["loss"] = loss
    results["num_examples"] = int(len(predictions.labels))
    return results


def collapse_warning(predictions: Predictions, id2label: dict[int, str] | None = None) -> str | None:
    """A warning when the model gives every example the same answer although the gold labels differ:
    what a model that stopped learning (or never started) looks like, whatever its accuracy."""
    if len(predictions.labels) < 2 or len(np.unique(predictions.labels)) < 2:
        return None
    if is_regression(predictions):
        if np.ptp(predictions.logits[:, 0]) > 0:
            return None
        return f"the model predicts the same score for all {len(predictions.labels)} validation examples"
    predicted = np.unique(predictions.logits.argmax(-1))
    if len(predicted) > 1:
        return None
    name = (id2label or {}).get(int(predicted[0]), int(predicted[0]))
    return (
        f"the model predicts {name!r} for all {len(predictions.labels)} validation examples "
        f"(the data has {len(np.unique(predictions.labels))} classes): it has not learned the task"
    )


def evaluate_classifier(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader,
    names: tuple[str, ...] | list[str] = ("accuracy", "f1_macro"),
    on_nonfinite: str = "stop",
) -> dict[str, float | str]:
    """Metrics of `model` on a prepared validation dataloader (identical on every process).

    NaN or infinite outputs stop the run (a UserError; a `warning` with `on_nonfinite="skip"`, as
    train.on_nonfinite_loss=skip asks): a model that computes them is broken, and its
    metrics would look like a poor but finished run. One answer for every example adds a `warning`."""
    predictions = predict(accelerator, model, dataloader)
    bad = int((~np.isfinite(predictions.logits)).any(axis=-1).sum())
    nonfinite = (
        f"the model's outputs are NaN or infinite for {bad} of {len(predictions.labels)} validation examples: "
        "its weights diverged. Lower train.lr, keep train.weights_dtype=fp32, or check the data"
    )
    if bad and on_nonfinite == "stop":
        raise UserError(f"{nonfinite}; resume from an earlier checkpoint: train.resume_from=<run>/checkpoints/step_N.")
    metrics: dict[str, float | str] = classification_metrics(predictions, names)
    config = getattr(accelerator.unwrap_model(model), "config", None)
    warning = nonfinite if bad else collapse_warning(predictions, getattr(config, "id2label", None))
    if warning:
        metrics["warning"] = warning
    return metrics


def evaluator(run: Run, model, val_loader) -> Callable[[int], dict]:
    """The classify recipe's evaluation at a step: the configured metrics and the loss on the validation set."""
    cfg = run.cfg

    def evaluate(step: int) -> dict:
        return evaluate_classifier(
            run.accelerator, model, val_loader, cfg.resolved_metrics(), cfg.train.on_nonfinite_loss
        )

    return evaluate
