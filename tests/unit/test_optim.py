"""finetune.core.optim: the run's length and warmup in optimizer steps, the learning-rate schedules, weight decay."""

from __future__ import annotations

import pytest
import torch

from finetune.core.optim import build_optimizer, build_scheduler, total_optimizer_steps


def test_run_length_and_warmup_in_optimizer_steps():
    assert total_optimizer_steps(micro_batches_per_epoch=10, accumulation_steps=4, epochs=3, max_steps=None) == 9
    assert total_optimizer_steps(10, 4, epochs=3, max_steps=5) == 5
    model = torch.nn.Linear(2, 2)
    for warmup, expected_peak_step in ((0.25, 3), (4, 4)):  # a share of 10 steps (rounded up), or steps
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, "linear", total_steps=10, warmup=warmup)
        lrs = []
        for _ in range(10):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert lrs.index(max(lrs)) == expected_peak_step and max(lrs) == 1.0
        assert scheduler.get_last_lr()[0] == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_give_transformers_learning_rates(kind):
    """finetune.core.optim's own schedules (no Trainer import at startup) equal transformers' get_scheduler."""
    from transformers import get_scheduler

    def lrs(scheduler, optimizer) -> list[float]:
        out = []
        for _ in range(12):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours_optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    theirs_optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    theirs = get_scheduler(name, theirs_optimizer, num_warmup_steps=3, num_training_steps=10)
    ours = build_scheduler(ours_optimizer, kind, total_steps=10, warmup=3)
    assert lrs(ours, ours_optimizer) == pytest.approx(lrs(theirs, theirs_optimizer), rel=1e-12, abs=1e-15)


def test_no_weight_decay_on_biases_and_norms(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    decay, no_decay = build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias", "weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
