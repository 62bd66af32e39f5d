"""Scoring a classifier or regression head: predictions gathered from every process, each example counted once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from finetune.metrics import load_metric


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
    """The metrics `names` (offline `evaluate` modules, see finetune.metrics), the mean loss the model
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
    results = {}
    for name in names:
        metric = load_metric(name)
        (results[name],) = metric.compute(predictions=predicted, references=predictions.labels).values()
    results["loss"] = loss
    results["num_examples"] = int(len(predictions.labels))
    return results


def evaluate_classifier(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader,
    names: tuple[str, ...] | list[str] = ("accuracy", "f1_macro"),
) -> dict[str, float]:
    """Metrics of `model` on a prepared validation dataloader (identical on every process)."""
    return classification_metrics(predict(accelerator, model, dataloader), names)
