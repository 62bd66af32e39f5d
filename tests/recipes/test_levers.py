"""Memory and speed levers: length-grouped batches, gradient checkpointing, LoRA."""

from __future__ import annotations

import json

import torch
from conftest import reset_accelerate_state
from test_recipe_classify import recipe_main, run_bad, toy_args
from transformers import AutoModelForSequenceClassification, pipeline

from finetune.core.data import LengthGroupedSampler


def padding_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    """Padding tokens / all tokens when `order` is cut into batches padded to their longest."""
    padded = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded


def test_length_grouped_order_is_a_seeded_permutation_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 60, (2000,), generator=g)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(2000))
    assert list(sampler) == epoch0  # iterating again does not change the order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(2000))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # an epoch's order depends on seed and epoch only (resumable)
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=4)) != epoch0
    shuffled = torch.randperm(2000, generator=g).tolist()
    assert padding_share(epoch0, lengths, 16) < 0.02 < 0.4 < padding_share(shuffled, lengths, 16)
    # Batches are not in length order: the batch order is shuffled.
    batch_maxima = [max(lengths[j] for j in epoch0[i : i + 16]) for i in range(0, 2000, 16)]
    assert batch_maxima[0] == max(lengths)  # the longest batch comes first
    assert batch_maxima[1:] != sorted(batch_maxima[1:], reverse=True)


def test_short_last_batch_stays_last_so_batches_stay_aligned():
    lengths = list(range(1, 51))  # 50 examples, batches of 8: 6 full and one of 2
    order = list(LengthGroupedSampler(lengths, batch_size=8, seed=0))
    assert sorted(order) == list(range(50))
    for i in range(0, 48, 8):
        batch = sorted(lengths[j] for j in order[i : i + 8])
        assert batch[-1] - batch[0] == 7  # 8 consecutive lengths: each full batch is one sorted run


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert):
    batch = {"input_ids": torch.randint(5, 26, (4, 12)), "labels": torch.tensor([0, 1, 2, 0])}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads, strict=True))


def run_in_process(args: list[str], capsys) -> str:
    reset_accelerate_state()
    recipe_main()(args)
    reset_accelerate_state()
    return capsys.readouterr().out


def test_recipe_with_gradient_checkpointing(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "ckpt"
    run_in_process(toy_args(tiny_bert, toy_data, out, "train.gradient_checkpointing=true", "train.max_steps=4"), capsys)
    assert json.loads((out / "eval_results.json").read_text())["step"] == 4


def test_recipe_with_lora_saves_a_merged_model_and_the_adapter(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "lora"
    args = toy_args(tiny_bert, toy_data, out, "lora.enabled=true", "lora.target_modules=[query,value]", "train.lr=1e-2")
    stdout = run_in_process(args, capsys)
    line = next(line for line in stdout.splitlines() if line.startswith("model:"))
    total, trainable = (int(line.split()[i].replace(",", "")) for i in (1, 3))
    assert 0 < trainable < total / 2  # adapters on query/value and the classifier head only
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    records = [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    classifier = pipeline("text-classification", model=str(out / "final"), device="cpu")
    assert classifier("apple pear plum")[0]["label"] in {"animal", "fruit", "vehicle"}
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_lora_targets_that_match_nothing_list_what_exists(tiny_bert, toy_data, tmp_path, capsys):
    err = run_bad(
        toy_args(tiny_bert, toy_data, tmp_path / "o", "lora.enabled=true", "lora.target_modules=[q_proj]"), capsys
    )
    assert "lora.target_modules: ['q_proj'] match no linear layer of this model" in err
    assert "query" in err and "value" in err
