"""Gradient accumulation equals one large batch: windows, normalisation, logged loss."""

from __future__ import annotations

import pytest
import torch
from helpers import keyword_rows, reset_accelerate_state, write_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, tokenize
from finetune.core.config import build_config
from finetune.core.data import make_dataloader
from finetune.core.schemas import DataConfig, TrainConfig
from finetune.training.accumulation import (
    IGNORE_INDEX,
    LossMeter,
    accumulation_windows,
    count_label_terms,
    count_next_token_terms,
    summed_classification_loss,
    summed_next_token_loss,
)
from finetune.training.launch import make_accelerator


def fresh_accelerator(k: int, **train):
    """A new single-process CPU Accelerator (Accelerate keeps global state between instances)."""
    reset_accelerate_state()
    accelerator, _ = make_accelerator(
        build_config(TrainConfig, [("test", {"gradient_accumulation_steps": k, **train})])
    )
    return accelerator


@pytest.fixture(scope="module")
def toy_examples(tiny_bert, tmp_path_factory):
    path = write_rows(tmp_path_factory.mktemp("acc") / "train.csv", keyword_rows(29, seed=5))
    cfg = build_config(DataConfig, [("test", {"train": str(path), "validation": str(path)})])
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return tokenize(load_classification_data(cfg).train, tokenizer, 32), tokenizer


def tiny_classifier(tiny_bert):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def window_gradients(accelerator, model, loader, normalise: bool = True) -> list[list[torch.Tensor]]:
    """The accumulated gradient of every window, read at its sync point."""
    grads = []
    for batch, window in accumulation_windows(accelerator, loader, count_label_terms):
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            summed = summed_classification_loss(model(**batch).logits, labels)
            if normalise:
                loss = window.normalise(summed)
            else:  # the common bug: mean loss of the micro-batch, divided by k (by accelerator.backward)
                loss = summed / len(labels)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grads.append([p.grad.clone() for p in model.parameters()])
                model.zero_grad()
    return grads


def big_batch_gradients(
    model, examples, tokenizer, window_examples: list[int], pad_to: int | None = None
) -> list[list[torch.Tensor]]:
    """Gradient of the mean loss over each window's examples, taken as one batch."""
    grads, start = [], 0
    for size in window_examples:
        window = examples.select(range(start, start + size))
        batch = next(iter(make_dataloader(window, size, padding_collator(tokenizer, pad_to))))
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}  # the GPU, where there is one
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        start += size
    return grads


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)))
    return float(diff / torch.sqrt(sum((y**2).sum() for y in b)))


@pytest.mark.parametrize(
    ("dtype", "pad_to", "bound"),
    [
        # fp64, each batch padded to its own longest: the maths is exact up to fp64 rounding.
        (torch.float64, None, 1e-10),
        # fp32: splitting this batch in plain PyTorch, without any of our code, already moves its
        # gradient by 1.5e-5 (measured): that is fp32's floor here, and the bound sits just above it.
        (torch.float32, 32, 5e-5),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_accumulated_gradient_equals_big_batch_gradient(k, dtype, pad_to, bound, tiny_bert, toy_examples):
    examples, tokenizer = toy_examples  # 29 examples, micro-batches of 3: 10 micro-batches, the last of 2
    accelerator = fresh_accelerator(k)
    model = accelerator.prepare(tiny_classifier(tiny_bert).to(dtype))
    loader = make_dataloader(examples, 3, padding_collator(tokenizer, pad_to))
    got = window_gradients(accelerator, model, loader)
    sizes = [3] * 9 + [2]
    window_examples = [sum(sizes[i : i + k]) for i in range(0, len(sizes), k)]
    assert len(got) == len(window_examples)  # the short last window still steps
    want = big_batch_gradients(model, examples, tokenizer, window_examples, pad_to)
    for g, w in zip(got, want, strict=True):
        assert relative_difference(g, w) <= bound


def test_dividing_by_k_is_wrong_for_a_short_window(tiny_bert, toy_examples):
    """The same check fails for the usual mean-loss / k: the test above can fail."""
    examples, tokenizer = toy_examples
    accelerator = fresh_accelerator(4)
    model = accelerator.prepare(tiny_classifier(tiny_bert))
    loader = make_dataloader(examples, 3, padding_collator(tokenizer, 32))
    naive = window_gradients(accelerator, model, loader, normalise=False)
    want = big_batch_gradients(model, examples, tokenizer, [12, 12, 5], pad_to=32)
    assert relative_difference(naive[0], want[0]) <= 5e-5  # full windows of equal batches: right
    assert relative_difference(naive[2], want[2]) > 0.1  # 2 micro-batches (3+2 examples) divided by 4


def test_windows_sync_once_at_each_window_end():
    accelerator = fresh_accelerator(3)
    batches = [{"labels": torch.tensor([0] * n)} for n in (2, 3, 1, 4, 2, 2, 5)]
    syncs, windows = [], []
    for _batch, window in accumulation_windows(accelerator, batches, count_label_terms):
        with accelerator.accumulate():
            syncs.append(accelerator.sync_gradients)
            windows.append((window.size, window.num_loss_terms))
    assert syncs == [False, False, True, False, False, True, True]
    assert windows == [(3, 6)] * 3 + [(3, 8)] * 3 + [(1, 5)]
    # And again in a second epoch: the counter is aligned at each window start.
    syncs = []
    for _batch, _window in accumulation_windows(accelerator, batches, count_label_terms):
        with accelerator.accumulate():
            syncs.append(accelerator.sync_gradients)
    assert syncs == [False, False, True, False, False, True, True]


def test_windows_need_the_plugin_that_does_not_sync_with_the_dataloader():
    from accelerate import Accelerator

    reset_accelerate_state()
    with pytest.raises(RuntimeError, match="sync_with_dataloader=False"):
        next(accumulation_windows(Accelerator(gradient_accumulation_steps=2), [], count_label_terms))


def test_ignored_labels_are_not_loss_terms():
    batch = {"labels": torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8]])}
    assert int(count_label_terms({"labels": torch.tensor([1, 0, IGNORE_INDEX])})) == 2
    assert int(count_next_token_terms(batch)) == 3  # after the shift: [6, -100] and [7, 8]


def test_summed_next_token_loss_matches_the_model_mean_times_count():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    input_ids = torch.randint(0, 50, (3, 9))
    labels = input_ids.clone()
    labels[0, 6:] = IGNORE_INDEX  # padding
    labels[1, :3] = IGNORE_INDEX  # a prompt that is not trained on
    out = model(input_ids=input_ids, labels=labels)
    count = count_next_token_terms({"labels": labels})
    assert float(summed_next_token_loss(out.logits, labels)) == pytest.approx(float(out.loss * count), rel=1e-6)


def test_regression_head_sums_squared_errors():
    logits = torch.tensor([[1.0], [2.0]])
    assert float(summed_classification_loss(logits, torch.tensor([0.5, 4.0]))) == pytest.approx(0.25 + 4.0)


def test_loss_meter_reports_the_true_mean_over_terms():
    accelerator = fresh_accelerator(2)
    meter = LossMeter()
    batches = [{"labels": torch.zeros(n, dtype=torch.long)} for n in (1, 3, 2)]
    per_example_losses = [[4.0], [1.0, 1.0, 1.0], [0.5, 0.5]]
    for (_batch, window), losses in zip(
        accumulation_windows(accelerator, batches, count_label_terms), per_example_losses, strict=True
    ):
        meter.add(torch.tensor(sum(losses)), window)
    assert meter.pop_mean(accelerator) == pytest.approx(8.0 / 6)  # not the mean of micro-batch means
    assert meter.pop_mean(accelerator) != meter.pop_mean(accelerator)  # empty interval: nan
