"""k micro-batches of b train exactly like one batch of k*b: parameters after several optimizer steps, for a
classifier and a causal LM on variable-length data, with the library pieces the recipes use, in one process.
Through the recipe, in one and two processes: tests/distributed/test_exactness.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import reset_accelerate_state, tiny_llama_config
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from finetune.core.config import build_config
from finetune.core.schemas import TrainConfig
from finetune.training.accumulation import (
    IGNORE_INDEX,
    accumulation_windows,
    count_label_terms,
    count_next_token_terms,
    summed_classification_loss,
    summed_next_token_loss,
)
from finetune.training.launch import make_accelerator


def random_examples(n: int, vocab: int, seed: int) -> list[dict]:
    """Token sequences of 3..16 tokens; causal-LM labels mask a prompt of 0..2 tokens."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(3, 17, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, 3, (1,), generator=g))] = IGNORE_INDEX
        examples.append({"input_ids": ids, "lm_labels": labels, "class": i % 3})
    return examples


def collate(examples: list[dict], task: str) -> dict:
    """Pad to the batch's longest (pad id 0, label -100), as the recipes' collator does."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lm_labels = torch.full_like(ids, IGNORE_INDEX)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], mask[row, :n], lm_labels[row, :n] = e["input_ids"], 1, e["lm_labels"]
    labels = lm_labels if task == "lm" else torch.tensor([e["class"] for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_model(task: str, tiny_bert) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "lm":
        return LlamaForCausalLM(tiny_llama_config(vocab_size=40))
    return AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def train(task: str, tiny_bert, micro: int, k: int, optimizer: str, examples: list[dict]) -> list[torch.Tensor]:
    """Parameters after training on `examples` in order, micro-batches of `micro`, accumulating `k`."""
    reset_accelerate_state()
    accelerator, _ = make_accelerator(build_config(TrainConfig, [("t", {"gradient_accumulation_steps": k})]))
    model = make_model(task, tiny_bert)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.5)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-3)
    )
    model, opt = accelerator.prepare(model, opt)
    batches = [collate(examples[i : i + micro], task) for i in range(0, len(examples), micro)]
    count, summed = (
        (count_next_token_terms, summed_next_token_loss)
        if task == "lm"
        else (count_label_terms, summed_classification_loss)
    )
    steps = 0
    for batch, window in accumulation_windows(accelerator, batches, count):
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            accelerator.backward(window.normalise(summed(model(**batch).logits, labels)))
            if accelerator.sync_gradients:
                opt.step()
                opt.zero_grad()
                steps += 1
    assert steps == math.ceil(len(batches) / k)
    return [p.detach().clone() for p in model.parameters()]


# SGD: the update is the gradient times lr, so fp32 rounding of the gradient (~1e-5 relative, see
# test_accumulation.py) stays ~1e-7 in the parameters. Adam divides each coordinate by its own RMS, so a
# coordinate whose gradient is near zero turns rounding noise into a step of up to lr (1e-3) each time;
# its bound is a few lr.
BOUNDS = {"sgd": 1e-6, "adamw": 3e-3}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("task", ["classify", "lm"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_parameters_after_accumulated_steps_equal_big_batch_steps(task, k, optimizer, tiny_bert):
    # 26 examples in micro-batches of 2: 13 micro-batches, so k=2, 4, 8 end on a short window.
    examples = random_examples(26, vocab=26 if task == "classify" else 40, seed=7)
    accumulated = train(task, tiny_bert, micro=2, k=k, optimizer=optimizer, examples=examples)
    big_batch = train(task, tiny_bert, micro=2 * k, k=1, optimizer=optimizer, examples=examples)
    worst = max(float((a - b).abs().max()) for a, b in zip(accumulated, big_batch, strict=True))
    assert worst <= BOUNDS[optimizer]


def test_naive_division_by_k_gives_other_parameters(tiny_bert):
    """Counter-check on the causal LM: mean loss per micro-batch / k moves the parameters elsewhere."""
    examples = random_examples(26, vocab=40, seed=7)
    reset_accelerate_state()
    accelerator, _ = make_accelerator(build_config(TrainConfig, [("t", {"gradient_accumulation_steps": 4})]))
    model = make_model("lm", tiny_bert)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = accelerator.prepare(model, opt)
    for i in range(0, 26, 2):
        batch = {name: tensor.to(accelerator.device) for name, tensor in collate(examples[i : i + 2], "lm").items()}
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)  # HF mean loss; accelerate divides by k
            if accelerator.sync_gradients:
                opt.step()
                opt.zero_grad()
    naive = [p.detach().clone() for p in model.parameters()]
    big_batch = train("lm", tiny_bert, micro=8, k=1, optimizer="sgd", examples=examples)
    assert max(float((a - b).abs().max()) for a, b in zip(naive, big_batch, strict=True)) > 1e-3
