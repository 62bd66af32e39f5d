"""The classifier: its head from the labels, loading it, and its loss."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune.core import quantization
from finetune.core.modeling import build_skeleton, load_model_config, load_pretrained, skip_unquantized
from finetune.training.accumulation import summed_classification_loss

# id2label name of a regression head's single output: pipeline("text-classification") reports it as the label.
REGRESSION_LABEL = "score"


def head_config(label_names: list[str], task: str = "classification") -> dict:
    """Config of a fresh classification head: its outputs, their names, and the problem type.

    problem_type "regression" makes pipeline("text-classification") return the raw score (it would apply a
    sigmoid to a 1-output head otherwise); None keeps a classifier's config as before."""
    if task == "regression":
        id2label = {0: REGRESSION_LABEL}
        problem_type = "regression"
    else:
        id2label = dict(enumerate(label_names))
        problem_type = None  # resets a regression checkpoint's type when it is fine-tuned to classify
    return {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {name: i for i, name in id2label.items()},
        "problem_type": problem_type,
    }


def load_classifier(
    cfg,
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    task: str = "classification",
    dtype: torch.dtype = torch.float32,
    **quantized,
) -> PreTrainedModel:
    """A sequence-classification model with a fresh head for `label_names` (or one regression output),
    labels saved in its config, its weights in `dtype` whatever the checkpoint stores (see finetune.core.precision).
    `quantized`: `finetune.core.quantization.loading_kwargs` (its quantization_config and device_map)."""
    if quantized:
        config = load_model_config(cfg, num_labels=max(1, len(label_names)))
        skip_unquantized(quantized, build_skeleton(config, AutoModelForSequenceClassification))
    model = load_pretrained(
        AutoModelForSequenceClassification,
        cfg,
        "model",
        **head_config(label_names, task),
        ignore_mismatched_sizes=True,  # a checkpoint fine-tuned on other labels gets a fresh head
        dtype=dtype,  # transformers 5 would keep the stored dtype (dtype="auto")
        **quantized,
    )
    if quantized:
        quantization.keep_training_numerics(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def classification_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed loss of a micro-batch: cross-entropy, or squared error for a regression head."""
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    return summed_classification_loss(model(**inputs).logits, batch["labels"])
