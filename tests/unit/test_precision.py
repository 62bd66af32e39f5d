"""Half-precision checkpoints, in one process: loaded with fp32 weights unless pure bf16 is chosen, impossible
combinations refused, and a run that did not learn (one class for everything) flagged. Training them through the
recipe is in tests/recipes/test_precision.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from helpers import stored_dtypes
from transformers import AutoModelForSequenceClassification

from finetune.classify.evaluate import Predictions, collapse_warning
from finetune.classify.model import load_classifier
from finetune.core.errors import UserError
from finetune.core.precision import check_precision, check_trainable_dtypes
from finetune.core.schemas import ModelConfig


@pytest.mark.parametrize("stored", ["bf16", "fp16"])
def test_half_precision_checkpoints_load_with_fp32_weights_unless_bf16_is_asked(stored, half_berts):
    assert stored_dtypes(half_berts[stored]) == {"BF16" if stored == "bf16" else "F16"}
    cfg = ModelConfig(name_or_path=str(half_berts[stored]))
    names = ["a", "b", "c"]
    fp32 = load_classifier(cfg, names, tokenizer=SimpleNamespace(pad_token_id=0))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    bf16 = load_classifier(cfg, names, SimpleNamespace(pad_token_id=0), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    check_trainable_dtypes(fp32, "fp32")
    check_trainable_dtypes(bf16, "bf16")
    with pytest.raises(UserError, match="trainable parameters are torch.bfloat16"):
        check_trainable_dtypes(bf16, "fp32")


def test_fp16_weights_crash_the_gradient_scaler_and_fp32_masters_do_not(half_berts):
    """The GPU crash of fp16 mixed precision on an fp16 checkpoint ("Attempting to unscale FP16 gradients"),
    reproduced with PyTorch's gradient scaler on CPU, and gone with the weights load_classifier gives."""

    def scaled_step(model) -> None:
        scaler = torch.amp.GradScaler("cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logits = model(input_ids=torch.tensor([[2, 10, 20, 3]])).logits
        scaler.scale(logits.float().sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)

    stored = AutoModelForSequenceClassification.from_pretrained(half_berts["fp16"])  # transformers' default: as stored
    assert next(stored.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaled_step(stored)
    cfg = ModelConfig(name_or_path=str(half_berts["fp16"]))
    scaled_step(load_classifier(cfg, ["a", "b", "c"], SimpleNamespace(pad_token_id=0)))


def launched(mixed_precision: str = "no", distributed: DistributedType = DistributedType.NO):
    return SimpleNamespace(mixed_precision=mixed_precision, distributed_type=distributed, device=torch.device("cpu"))


def test_pure_bf16_is_refused_where_it_cannot_work():
    check_precision("bf16", launched("bf16"))
    check_precision("bf16", launched("no"))
    check_precision("fp32", launched("fp16", DistributedType.DEEPSPEED))
    with pytest.raises(UserError, match="--mixed_precision bf16"):
        check_precision("bf16", launched("fp16"))
    for distributed in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(UserError, match="its own fp32 master weights"):
            check_precision("bf16", launched("bf16", distributed))


def predictions(logits: list[list[float]], labels: list) -> Predictions:
    return Predictions(np.array(logits, dtype=np.float32), np.array(labels))


def test_one_answer_for_every_example_is_flagged():
    one_class = predictions([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]], [0, 1, 1])
    assert "predicts 'pos' for all 3 validation examples (the data has 2 classes)" in collapse_warning(
        one_class, {0: "neg", 1: "pos"}
    )
    assert collapse_warning(predictions([[0.9, 0.1], [0.2, 0.8]], [0, 1])) is None
    assert collapse_warning(predictions([[0.1, 0.9], [0.2, 0.8]], [1, 1])) is None  # the data has one class
    constant = predictions([[2.5], [2.5], [2.5]], [0.5, 1.5, 4.0])
    assert "the same score for all 3" in collapse_warning(constant)
