"""finetune.training in-process: one optimizer step over a window, the position record, the stop signals."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from helpers import reset_accelerate_state
from torch.utils.data import DataLoader

from finetune.core.errors import UserError
from finetune.training.accumulation import count_label_terms, summed_classification_loss
from finetune.training.loop import EarlyStopping
from finetune.training.progress import Progress
from finetune.training.step import StopSignals, TrainStep, training_windows


def make_accelerator(k: int) -> Accelerator:
    reset_accelerate_state()
    plugin = GradientAccumulationPlugin(num_steps=k, sync_with_dataloader=False)
    return Accelerator(cpu=True, gradient_accumulation_plugin=plugin)


def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return summed_classification_loss(model(batch["input_ids"].float()), batch["labels"])


def examples(n: int, seed: int = 0) -> list[dict]:
    """`n` examples (4 features, 3 classes); about a quarter of the labels ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    features = torch.randn(n, 4, generator=g)
    return [{"input_ids": features[i], "labels": labels[i]} for i in range(n)]


def loader(accelerator: Accelerator, data: list[dict], size: int):
    return accelerator.prepare(DataLoader(data, batch_size=size))


def run(k: int, data: list[dict], size: int, steps: int, **step_kwargs):
    accelerator = make_accelerator(k)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.1 * s)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_loader = loader(accelerator, data, size)
    progress = Progress(accumulation_steps=k, batches_per_epoch=len(train_loader))
    reports = []
    with StopSignals() as signals:
        train_step = TrainStep(accelerator, model, optimizer, scheduler, loss_fn, signals, info=print, **step_kwargs)
        for window in training_windows(accelerator, train_loader, progress, steps, count_label_terms, seed=0):
            reports.append(train_step(window, progress))
    return model, progress, train_step, reports


def test_a_window_of_k_micro_batches_steps_like_one_big_batch_with_clipping():
    data = examples(24)
    small, _, _, _ = run(4, data, 3, steps=2, max_grad_norm=0.05)
    big, _, step, _ = run(1, data, 12, steps=2, max_grad_norm=0.05)
    assert float(step.grad_norm) > 0.05, "clipping never acted: the test would not see clipping per micro-batch"
    for a, b in zip(small.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_progress_advances_through_epochs_and_the_log_record_is_the_true_mean():
    data = examples(15)  # 5 micro-batches of 3, k=2: windows of 2, 2, 1 per epoch
    _, progress, step, _ = run(2, data, 3, steps=4)
    assert (progress.step, progress.epoch, progress.batches_into_epoch) == (4, 1, 2)
    assert progress.epochs == pytest.approx(1.4)
    labels = torch.stack([e["labels"] for e in data])
    assert progress.samples_seen == int((labels != -100).sum() + (labels[:6] != -100).sum())  # an epoch + 1 window
    record = step.log_record()
    assert set(record) >= {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"}
    assert record["lr"] == pytest.approx(0.5 * (1 - 0.1 * 4))


def test_training_windows_continue_where_progress_stands():
    data = examples(12)
    accelerator = make_accelerator(2)
    progress = Progress(step=1, batches_into_epoch=2, accumulation_steps=2, batches_per_epoch=6)
    first = next(training_windows(accelerator, loader(accelerator, data, 2), progress, 3, count_label_terms, seed=0))
    assert torch.equal(first.batches[0]["input_ids"], torch.stack([data[4]["input_ids"], data[5]["input_ids"]]))


def test_a_nonfinite_loss_stops_by_default_and_is_skipped_on_request():
    data = examples(12)
    data[6]["input_ids"][0], data[6]["labels"] = float("nan"), torch.tensor(1)  # in window 2 (micro-batches of 3, k=2)
    with pytest.raises(UserError, match="not finite.*optimizer step 2"):
        run(2, data, 3, steps=2)
    model, progress, _, reports = run(2, data, 3, steps=2, on_nonfinite="skip")
    assert [r.skipped for r in reports] == [False, True]
    before, _, _, _ = run(2, data, 3, steps=1)
    for a, b in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(a, b)  # the skipped step changed nothing
    assert progress.step == 2  # but it counts as a step: the schedule and the data move on


def test_a_signal_asks_for_a_stop_after_the_step_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    accelerator = make_accelerator(2)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    progress = Progress(accumulation_steps=2, batches_per_epoch=4)
    with pytest.raises(RuntimeError, match="boom"), StopSignals() as signals:
        train_step = TrainStep(accelerator, model, optimizer, scheduler, loss_fn, signals, info=print)
        windows = training_windows(accelerator, loader(accelerator, examples(12), 3), progress, 2, count_label_terms, 0)
        os.kill(os.getpid(), signal.SIGTERM)
        report = train_step(next(windows), progress)
        assert report.stop and signals.name == "SIGTERM" and progress.step == 1
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is previous


# --------------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------------


def run_evaluations(stopping: EarlyStopping, values: list[float], progress: Progress | None = None):
    """Feed one evaluation per step; the verdicts, and the progress record that carries the state."""
    progress = progress or Progress(batches_per_epoch=10)
    verdicts = []
    for value in values:
        progress.step += 1
        verdicts.append(stopping.update(progress, {stopping.metric: value}))
        if verdicts[-1].stop:
            break
    return verdicts, progress


def test_early_stopping_counts_evaluations_without_improvement():
    verdicts, progress = run_evaluations(EarlyStopping(2, 0.0, "loss"), [1.0, 0.8, 0.9, 0.7, 0.75, 0.7, 0.5])
    assert [v.new_best for v in verdicts] == [True, True, False, True, False, False]  # 0.7 again is no better
    assert [v.stop for v in verdicts] == [False] * 5 + [True]
    assert (progress.step, progress.best_step, progress.best_value) == (6, 4, 0.7)
    assert "after step 6" in verdicts[-1].reason and "was at step 4" in verdicts[-1].reason

    higher = EarlyStopping(1, 0.0, "accuracy")
    verdicts, progress = run_evaluations(higher, [0.5, 0.6, 0.6])  # equal is no improvement
    assert [v.stop for v in verdicts] == [False, False, True] and progress.best_step == 2


def test_min_delta_and_nan_are_not_improvements_but_the_best_is_still_tracked():
    stopping = EarlyStopping(2, 0.05, "accuracy")
    verdicts, progress = run_evaluations(stopping, [0.50, 0.53, 0.56, 0.9])
    # 0.53 beats 0.50 (a new best, checkpointed) but not by more than 0.05; 0.56 is +0.06 over 0.50
    assert [v.new_best for v in verdicts] == [True, True, True, True]
    assert progress.evals_without_improvement == 0 and not stopping.stopped
    verdicts, progress = run_evaluations(EarlyStopping(2, 0.0, "loss"), [1.0, float("nan"), float("nan")])
    assert [v.new_best for v in verdicts] == [True, False, False] and verdicts[-1].stop


def test_early_stopping_state_survives_a_checkpoint_round_trip(tmp_path):
    import json
    from dataclasses import asdict

    from finetune.training.checkpoints.layout import read_progress

    stopping = EarlyStopping(3, 0.0, "loss")
    _, progress = run_evaluations(stopping, [1.0, 0.5, 0.6, 0.7])  # 2 evaluations without improvement
    (tmp_path / "progress.json").write_text(json.dumps(asdict(progress)))
    restored = read_progress(tmp_path)
    verdicts, restored = run_evaluations(EarlyStopping(3, 0.0, "loss"), [0.55], restored)
    assert verdicts[-1].stop and restored.best_step == 2


def test_disabled_early_stopping_never_stops_or_checkpoints():
    verdicts, progress = run_evaluations(EarlyStopping(None, 0.0, "loss"), [1.0, 2.0, 3.0, 4.0])
    assert not any(v.stop or v.new_best for v in verdicts) and progress.best_step is None
