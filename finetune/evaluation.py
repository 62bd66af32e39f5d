"""Scoring a classifier: predictions gathered from every process, each example counted once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.metrics import accuracy_score, f1_score


@dataclass
class Predictions:
    """Logits and gold labels of a whole evaluation set, in dataset order."""

    logits: np.ndarray  # (examples, classes)
    labels: np.ndarray  # (examples,)


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


def classification_metrics(predictions: Predictions) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of `predictions`."""
    predicted = predictions.logits.argmax(-1)
    logits = torch.from_numpy(predictions.logits)
    labels = torch.from_numpy(predictions.labels).long()
    return {
        "accuracy": float(accuracy_score(predictions.labels, predicted)),
        "f1_macro": float(f1_score(predictions.labels, predicted, average="macro")),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "num_examples": int(len(predictions.labels)),
    }


def evaluate_classifier(accelerator: Accelerator, model: torch.nn.Module, dataloader) -> dict[str, float]:
    """Metrics of `model` on a prepared validation dataloader (identical on every process)."""
    return classification_metrics(predict(accelerator, model, dataloader))
