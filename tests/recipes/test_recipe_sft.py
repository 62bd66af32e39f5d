"""recipes/sft.py end to end on a tiny random LLaMA: outputs, exact accumulation by target tokens, packing, resume,
bad input. (Two processes training like one: tests/distributed/test_exactness.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    SFT,
    chats,
    final_weights,
    max_difference,
    read_jsonl,
    recipe_main,
    reset_accelerate_state,
    run_bad,
    sft_args,
    without_chat_template,
    write_rows,
)


def test_run_writes_a_generating_model_eval_metrics_and_generations(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, out, "train.epochs=2", "eval.every_n_steps=6"))
    stdout = capsys.readouterr().out
    assert "done: " in stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 24 and results["epoch"] == 2.0  # 48 examples / 4 per step, 2 epochs
    assert results["perplexity"] == pytest.approx(2.718281828 ** results["loss"], rel=1e-6)
    assert 0 <= results["exact_match"] <= 1 and results["warnings"] == []
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12, 18, 24]
    generations = read_jsonl(out / "generations" / "step_000024.jsonl")
    assert len(generations) == 3 and {"prompt", "reference", "generated"} <= set(generations[0])

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(out / "final"), device="cpu")
    chat = [{"role": "user", "content": "reverse abc"}]
    reply = generator(chat, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant"  # the chat template travelled with final/

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and "sft" in card.data.tags
    assert "random weights" in card.text and f"{results['perplexity']:.4g}" in card.text
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "logs" / "finetune").is_dir()
    reset_accelerate_state()


def test_dry_run_reports_rows_steps_parameters_and_memory_without_writing(tiny_lm, chat_data, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "run"
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, out, "train.epochs=2", "data.packing=true", "--dry-run"))
    printed = capsys.readouterr().out
    assert not out.exists(), "a dry run writes nothing"
    assert "train: 48 examples: 48 kept (0 truncated to 64 tokens)" in printed
    rows = int(printed.split("packed rows of up to 64 tokens")[0].rsplit("; ", 1)[1].replace(",", ""))
    assert 10 <= rows < 48
    assert f"optimizer steps: {2 * -(-rows // 4)} (2 epochs)" in printed
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_lm))
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,}, {total:,} trainable (100.00%)" in printed
    longest = int(re.search(r"peak memory per process at micro-batch 4 x (\d+) tokens \(estimate\)", printed).group(1))
    assert 50 < longest <= 64  # the longest packed row


def test_accumulated_and_chunked_and_packed_windows_train_like_one_big_batch(tiny_lm, chat_data, tmp_path, capsys):
    """One optimizer step over all 48 examples, split in several ways: the same weights. The windows hold
    prompts of different lengths, so dividing per micro-batch (or by k) would give other weights."""
    common = [
        "train.max_steps=1",
        "train.global_batch_size=48",
        "train.optimizer=sgd",
        "train.lr=1.0",
        "train.weight_decay=0",
        "train.max_grad_norm=null",
        "eval.num_generations=0",
    ]
    runs = {
        "48 x 1, plain loss": ["train.micro_batch_size=48", "train.chunked_loss=false"],
        "8 x 6, chunked loss": ["train.micro_batch_size=8"],
        "packed rows of 64": ["train.micro_batch_size=1", "data.packing=true", "train.global_batch_size=null"],
    }
    weights = {}
    for name, extra in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        if "packed" in name:  # as many micro-batches as packed rows: all of them in one window
            extra = [*extra, "train.gradient_accumulation_steps=48"]
        recipe_main(SFT)(sft_args(tiny_lm, chat_data, out, *common, *extra))
        weights[name] = final_weights(out)
    capsys.readouterr()
    reference = weights["48 x 1, plain loss"]
    initial = reference  # sanity: the step moved the weights
    for name, tensors in weights.items():
        assert max_difference(tensors, reference) <= 2e-6, name
    assert max_difference(initial, fresh_weights(tiny_lm)) > 1e-3
    reset_accelerate_state()


def fresh_weights(tiny_lm: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_lm))
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_resume_from_a_checkpoint_is_bitwise_equal(tiny_lm, chat_data, tmp_path, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["train.max_steps=6", "checkpoint.every_n_steps=3", "eval.num_generations=0", "data.packing=true"]
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, full, *args))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "eval_results.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step_000006", ignore_errors=True)
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, resumed, *args, "train.resume_from=latest"))
    assert "resumed from" in capsys.readouterr().out
    assert max_difference(final_weights(resumed), final_weights(full)) == 0.0
    reset_accelerate_state()


def test_bad_input_is_refused_before_the_model_loads(tiny_lm, chat_data, tmp_path, capsys):
    no_template = without_chat_template(tiny_lm, tmp_path / "no_template")
    err = run_bad(sft_args(no_template, chat_data, tmp_path / "a"), capsys, SFT)
    assert "data.chat_template" in err
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "b", "data.format=prompt_completion"), capsys, SFT)
    assert "data.prompt_column" in err or "completion" in err
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "c", "data.max_length=100000"), capsys, SFT)
    assert "data.max_length" in err
    for name in "abc":
        assert not (tmp_path / name).exists(), "a refused run wrote its output dir"


def test_bad_data_with_no_example_left_after_tokenizing_is_refused_before_the_model_loads(
    tiny_lm, chat_data, tmp_path, capsys, monkeypatch
):
    import finetune.core.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(finetune.core.modeling, "load_causal_lm", no_model)
    # Every training chat is longer than 8 tokens: all dropped with too_long=drop.
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "a", "data.max_length=8", "data.too_long=drop"), capsys, SFT)
    assert err.startswith("error: train: no example left") and "all 48 were dropped, 48 longer than" in err
    assert "data.max_length" in err and "data.too_long=truncate" in err
    # Cut to 8 tokens instead, no chat has an assistant token left: no target.
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "b", "data.max_length=8"), capsys, SFT)
    assert err.startswith("error: train: no example left") and "48 with no target token" in err
    assert "data.max_length" in err and "data.train_on_prompt=true" in err
    # Training chats fit, validation chats do not.
    long_chats = [
        {**row, "messages": [{"role": "user", "content": "x" * 100}, *row["messages"][-1:]]} for row in chats(5, 2)
    ]
    data = {**chat_data, "validation": write_rows(tmp_path / "long.jsonl", long_chats)}
    err = run_bad(sft_args(tiny_lm, data, tmp_path / "c", "data.too_long=drop"), capsys, SFT)
    assert err.startswith("error: validation: no example left") and "all 5 were dropped, 5 longer than" in err
    for name in "abc":
        assert not (tmp_path / name).exists(), "a refused run wrote its output dir"
    reset_accelerate_state()


def test_the_offline_demo_config_runs_from_its_shipped_files(tmp_path, capsys):
    """recipes/configs/sft/demo.yaml with its model dir, tokenizer and data as shipped (a few steps: the full
    run's accuracy is measured in the README, not here)."""
    out = tmp_path / "demo"
    demo = REPO / "recipes" / "configs" / "sft" / "demo.yaml"
    overrides = [
        "train.max_steps=3",
        "eval.num_generations=3",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
    ]
    recipe_main(SFT)(["--config", str(demo), *overrides, f"output.dir={out}"])
    assert "done" in capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 3 and "exact_match" in results and results["tokens"] > 0
    assert len(read_jsonl(out / "generations" / "step_000003.jsonl")) == 3
    reset_accelerate_state()


def test_lora_run_saves_a_merged_generating_model_and_its_adapter(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "lora"
    recipe_main(SFT)(
        sft_args(tiny_lm, chat_data, out, "lora.enabled=true", "train.max_steps=2", "eval.num_generations=0")
    )
    assert "trainable" in capsys.readouterr().out
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    merged = final_weights(out)
    assert not any("lora" in key for key in merged), "final/ must be a plain transformers model"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    generated = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
    reset_accelerate_state()
