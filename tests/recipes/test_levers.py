"""Memory and speed levers through the recipe: gradient checkpointing and LoRA. (Length-grouped batches are unit
tests in tests/unit/test_data.py, gradient checkpointing's gradients in tests/unit/test_modeling.py.)"""

from __future__ import annotations

import json

from helpers import recipe_main, reset_accelerate_state, run_bad, toy_args
from transformers import AutoModelForSequenceClassification, pipeline


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
