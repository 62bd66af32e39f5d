"""finetune.core.memory and out-of-memory handling, in one process: measuring AdamW's state changes no step, and an
out-of-memory error with several processes stops with what to set. `micro_batch_size: auto` under a fake memory
budget and recovering in the middle of a run, through the recipe, are in tests/recipes/test_memory.py."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from transformers import AutoModelForSequenceClassification

from finetune.classify.model import classification_loss
from finetune.core.errors import UserError
from finetune.core.memory import materialise_optimizer_state
from finetune.core.optim import build_optimizer
from finetune.training.accumulation import Window, WindowBackward


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_materialised_optimizer_state_changes_no_step(kind, tiny_bert):
    """Allocating AdamW's state before the first step (to measure it) leaves every later step bitwise the same."""

    def train(materialise: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
        optimizer = build_optimizer(model, 1e-3, 0.01, kind)
        if materialise:
            materialise_optimizer_state(optimizer)
            if kind == "adamw":
                assert all(len(optimizer.state[p]) >= 3 for p in model.parameters())  # step, exp_avg, exp_avg_sq
        for step in range(3):
            inputs = torch.randint(5, 20, (4, 7), generator=torch.Generator().manual_seed(step))
            classification_loss(model, {"input_ids": inputs, "labels": torch.tensor([0, 1, 2, 0])}).backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False), strict=True):
        assert torch.equal(a, b)


def test_out_of_memory_with_several_processes_stops_with_what_to_set():
    def out_of_memory(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    accelerator = SimpleNamespace(
        num_processes=2,
        distributed_type=DistributedType.MULTI_GPU,
        gradient_accumulation_steps=1,
        device=torch.device("cpu"),
        accumulate=lambda model: contextlib.nullcontext(),
    )
    window = Window(batches=[{"labels": torch.zeros(8, dtype=torch.long)}], num_loss_terms=16)
    with pytest.raises(UserError, match=r"micro-batch of 8 .* train.micro_batch_size below 8"):
        WindowBackward(accelerator, out_of_memory)(torch.nn.Linear(1, 1), window)
