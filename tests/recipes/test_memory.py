"""`micro_batch_size: auto` through the recipe under a memory budget that counts weights, gradients, optimizer state
and activations (a fake allocator on CPU, tests/fake_memory.py), and recovering from an out-of-memory error in
the middle of training. (The pieces, in one process: tests/unit/test_memory.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fake_memory import FakeMemory, fake_device_memory
from helpers import final_weights, recipe_main, reset_accelerate_state, toy_args
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, tokenize
from finetune.classify.model import classification_loss
from finetune.core.config import build_config
from finetune.core.data import longest_batch
from finetune.core.memory import rehearse_step
from finetune.core.optim import build_optimizer
from finetune.core.schemas import DataConfig


@pytest.fixture(scope="module")
def wide_bert(tiny_bert, tmp_path_factory) -> Path:
    """Wide enough that weights and AdamW state weigh as much as a batch's activations; no dropout, so that a
    micro-batch cut in two gives the same gradient."""
    path = tmp_path_factory.mktemp("wide_bert")
    config = BertConfig.from_pretrained(tiny_bert)
    config.update({"hidden_size": 64, "intermediate_size": 1024, "hidden_dropout_prob": 0.0})
    config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return path


def wide_args(wide_bert: Path, toy_data: dict, out: Path, *extra: str) -> list[str]:
    defaults = toy_args(wide_bert, toy_data, out)
    kept = [a for a in defaults if not a.startswith(("train.epochs", "train.gradient_accum", "train.micro"))]
    return kept + list(extra)


def test_auto_chooses_a_micro_batch_whose_whole_step_fits_the_budget(
    wide_bert, toy_data, tmp_path, monkeypatch, capsys
):
    # What one forward and backward of 16 examples holds (all the old probe measured), and what a whole step
    # with it holds: AdamW's two moments of every weight on top.
    data = load_classification_data(
        build_config(DataConfig, [("t", {"train": str(toy_data["train"]), "validation": str(toy_data["validation"])})])
    )
    tokenizer = AutoTokenizer.from_pretrained(wide_bert)
    batch = longest_batch(tokenize(data.train, tokenizer, 32), padding_collator(tokenizer), 16, torch.device("cpu"))
    meter = FakeMemory()
    model = meter.add_model(AutoModelForSequenceClassification.from_pretrained(wide_bert, num_labels=3))
    model.train()
    optimizer = meter.add_optimizer(build_optimizer(model, 1e-3, 0.01))
    with meter.counting():
        classification_loss(model, batch).backward()
        forward_backward = meter.peak()
        model.zero_grad(set_to_none=True)
        meter.reset_peak()
        rehearse_step(model, optimizer, classification_loss, batch, micro_batches=1)
        whole_step = meter.peak()
    state_bytes = 2 * sum(p.nbytes for p in model.parameters())
    assert whole_step >= forward_backward + state_bytes
    budget = (forward_backward + whole_step) / 2  # 16 passes the old probe, then cannot take its first step

    reset_accelerate_state()
    out = tmp_path / "auto"
    args = wide_args(wide_bert, toy_data, out, "train.micro_batch_size=auto", "train.global_batch_size=16")
    with fake_device_memory(monkeypatch, budget) as meter:
        recipe_main()(args + ["train.max_steps=6", "eval.every_n_steps=3"])
    log = capsys.readouterr().out
    micro = int(re.search(r"micro-batch (\d+) x accumulation", log).group(1))
    assert micro < 16
    # Any allocation over the budget raises; training and evaluation never did (no recovery was needed).
    assert "out of memory" not in log and 0 < meter.run_peak <= budget
    assert json.loads((out / "eval_results.json").read_text())["step"] == 6
    reset_accelerate_state()


def test_out_of_memory_in_the_middle_of_training_recovers_with_the_same_result(
    wide_bert, toy_data, tmp_path, monkeypatch, capsys
):
    """Out-of-memory errors injected in a forward (window 2) and in a backward (window 4, after part of the
    window's gradients accumulated): each window is redone with micro-batches cut in two, the same global
    batch, and the run ends where an undisturbed one does.

    Counting: window 1 runs forwards/backwards 1-2; forward 3 fails, window 2 is redone as 4 halves (backwards
    3-6), window 3 takes backwards 7-10, and window 4's second backward (13) fails."""
    common = ["train.micro_batch_size=8", "train.gradient_accumulation_steps=2", "train.max_steps=6"]
    runs = {}
    for name, faults in {"plain": {}, "recovered": {"forward": {3}, "backward": {13}}}.items():
        reset_accelerate_state()
        with fake_device_memory(monkeypatch) as meter:
            meter.fail_at.update(faults)
            recipe_main()(wide_args(wide_bert, toy_data, tmp_path / name, *common))
        runs[name] = tmp_path / name
        if faults:
            assert meter.injected == 2
    log = capsys.readouterr().out
    assert "step 2: out of memory with micro-batches of 8" in log
    assert "step 4: out of memory with micro-batches of 4" in log  # the second error halves again
    plain, recovered = final_weights(runs["plain"]), final_weights(runs["recovered"])
    worst = max(float((plain[name] - recovered[name]).abs().max()) for name in plain)
    assert worst <= 1e-5  # the same examples and normalisation, summed in another order
    results = [json.loads((runs[n] / "eval_results.json").read_text()) for n in ("plain", "recovered")]
    assert results[0]["step"] == results[1]["step"] == 6
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
    reset_accelerate_state()
