"""Through the recipes, as users launch them: however the global batch is split into micro-batches, accumulation
steps and processes (gloo), training ends at the same weights: recipes/classify.py (1 process x accumulation 4,
1 process x big batch, 2 processes x accumulation 2), recipes/sft.py (2 processes x micro-batch 2 x accumulation 2
against 1 process x micro-batch 8: target tokens counted globally) and recipes/dpo.py (16 x 1 = 4 x 4 = 2 processes x
4 x 2 pairs: each window a mean over its pairs). The library pieces, in one process: tests/unit/test_exactness.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import CLASSIFY, DPO, SFT, dpo_args, final_weights, launch, max_difference, read_jsonl, sft_args
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory, tiny_bert):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    config = AutoConfig.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModel.from_pretrained(tiny_bert, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return path


def test_recipe_split_of_the_global_batch_does_not_change_training(tiny_bert_no_dropout, toy_data, tmp_path):
    common = [
        f"model.name_or_path={tiny_bert_no_dropout}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=2",
        "train.global_batch_size=16",
        "train.optimizer=sgd",
        "train.lr=0.3",
        "train.weight_decay=0",
        "train.warmup_steps=0",
        "train.max_grad_norm=0.5",  # small enough that clipping acts: it must act on whole windows only
        "logging.every_n_steps=1",
    ]
    runs = {
        "1 process, 4 x 4": (1, ["train.micro_batch_size=4"]),
        "1 process, 16 x 1": (1, ["train.micro_batch_size=16"]),
        "2 processes, 4 x 2": (2, ["train.micro_batch_size=4"]),
    }
    weights, logs = {}, {}
    for name, (processes, extra) in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        result = launch(CLASSIFY, [*common, *extra, f"output.dir={out}"], processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name] = load_file(out / "final" / "model.safetensors")
        logs[name] = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]

    reference = weights["1 process, 16 x 1"]
    for name, tensors in weights.items():
        worst = max(float((tensors[key] - reference[key]).abs().max()) for key in reference)
        assert worst <= 1e-6, f"{name}: {worst}"
    total_steps = 2 * 240 // 16
    for name, records in logs.items():
        assert [r["step"] for r in records] == list(range(1, total_steps + 1)), name
        # The scheduler advanced once per optimizer step: linear decay, no warmup, in every run.
        for r in records:
            assert r["lr"] == pytest.approx(0.3 * (1 - r["step"] / total_steps), abs=1e-12), name
        # The logged loss is each window's true mean: the same however the window was split.
        for r, ref in zip(records, logs["1 process, 16 x 1"], strict=True):
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
    assert any(r["grad_norm"] > 0.5 for r in logs["1 process, 16 x 1"]), "clipping never acted: test too weak"


@pytest.mark.parametrize(
    "levers", [[], ["lora.enabled=true", "lora.dropout=0", "model.quantization=nf4"]], ids=["full", "qlora-nf4"]
)
def test_sft_two_processes_train_like_one(levers, tiny_lm, chat_data, tmp_path):
    """2 processes x micro-batch 2 x accumulation 2 equals 1 process x micro-batch 8: tokens counted globally
    (also with QLoRA under DDP: each process holds the quantized base, the adapters' gradients are all-reduced)."""
    if levers and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs .[quant]")
    common = [
        *levers,
        "train.max_steps=3",
        "train.global_batch_size=8",
        "train.optimizer=sgd",
        "train.lr=1.0",
        "train.weight_decay=0",
        "data.group_by_length=false",
        "eval.num_generations=2",
    ]
    weights, logs = {}, {}
    for name, (processes, micro) in {"one": (1, 8), "two": (2, 2)}.items():
        out = tmp_path / name
        args = sft_args(tiny_lm, chat_data, out, *common, f"train.micro_batch_size={micro}")
        result = launch(SFT, args, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name], logs[name] = final_weights(out), json.loads((out / "eval_results.json").read_text())
    assert max_difference(weights["two"], weights["one"]) <= 2e-6
    assert logs["two"]["tokens"] == logs["one"]["tokens"]  # every validation token counted once
    assert logs["two"]["loss"] == pytest.approx(logs["one"]["loss"], rel=1e-5)


def test_dpo_split_of_the_global_batch_does_not_change_training(tiny_lm, pair_data, tmp_path, monkeypatch):
    """16 pairs per step as 16 x 1, 4 x 4 and 2 processes x 4 x 2: the same weights, losses and rewards. The 2-process
    run computes its precomputed reference itself (cache off), its pairs split over the processes."""
    common = [
        "train.max_steps=3",
        "train.global_batch_size=16",
        "train.optimizer=sgd",
        "train.lr=1.0",
        "train.weight_decay=0",
        "dpo.beta=0.5",
        "eval.num_generations=0",
    ]
    runs = {"16 x 1": (1, 16), "4 x 4": (1, 4), "2 processes x 4 x 2": (2, 4)}
    weights, logs = {}, {}
    for name, (processes, micro) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        if processes > 1:
            monkeypatch.setenv("FINETUNE_CACHE", "off")
        result = launch(DPO, dpo_args(tiny_lm, pair_data, out, *common, f"train.micro_batch_size={micro}"), processes)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name] = final_weights(out)
        logs[name] = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    for name in runs:
        assert max_difference(weights[name], weights["16 x 1"]) <= 2e-6, name
        for record, expected in zip(logs[name], logs["16 x 1"], strict=True):
            for key in ("loss", "rewards/margin", "accuracy", "logps/chosen"):
                assert record[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (name, key)
    assert logs["16 x 1"][-1]["rewards/margin"] != 0, "the policy never moved from its reference: test too weak"
