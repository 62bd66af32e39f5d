"""recipes/sft.py end to end on a tiny random LLaMA: outputs, exact accumulation by target tokens (1 and 2
processes), packing, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch, read_jsonl, reset_accelerate_state, write_rows
from safetensors.torch import load_file
from test_lm_data import make_tokenizer

pytestmark = pytest.mark.recipe
SFT = REPO / "recipes" / "sft.py"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer LLaMA config (no weights: model.random_init) and a character tokenizer with a chat template."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(path)
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return path


def chats(n: int, seed: int) -> list[dict]:
    """Reverse a word: prompts of different lengths, so the masked prompt tokens differ per example."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))
        system = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
        user = {"role": "user", "content": f"reverse {word}" + " please" * rng.randint(0, 2)}
        rows.append({"messages": [*system, user, {"role": "assistant", "content": word[::-1]}]})
    return rows


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_data")
    return {
        "train": write_rows(root / "train.jsonl", chats(48, seed=0)),
        "validation": write_rows(root / "validation.jsonl", chats(12, seed=1)),
    }


def sft_args(tiny_lm: Path, data: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_lm}",
        "model.random_init=true",
        f"data.train={data['train']}",
        f"data.validation={data['validation']}",
        "data.max_length=64",
        "train.micro_batch_size=4",
        "train.global_batch_size=null",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        "train.lr_scheduler=linear",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "eval.batch_size=8",
        "eval.num_generations=3",
        "eval.max_new_tokens=8",
        "logging.every_n_steps=1",
        f"output.dir={output_dir}",
        *extra,
    ]


def recipe_main():
    reset_accelerate_state()
    spec = importlib.util.spec_from_file_location("sft_recipe", SFT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_run_writes_a_generating_model_eval_metrics_and_generations(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    recipe_main()(sft_args(tiny_lm, chat_data, out, "train.epochs=2", "eval.every_n_steps=6"))
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
    recipe_main()(sft_args(tiny_lm, chat_data, out, "train.epochs=2", "data.packing=true", "--dry-run"))
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


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


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
        recipe_main()(sft_args(tiny_lm, chat_data, out, *common, *extra))
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


@pytest.mark.multiprocess
def test_two_processes_train_like_one(tiny_lm, chat_data, tmp_path):
    """2 processes x micro-batch 2 x accumulation 2 equals 1 process x micro-batch 8: tokens counted globally."""
    common = [
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


def test_resume_from_a_checkpoint_is_bitwise_equal(tiny_lm, chat_data, tmp_path, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["train.max_steps=6", "checkpoint.every_n_steps=3", "eval.num_generations=0", "data.packing=true"]
    recipe_main()(sft_args(tiny_lm, chat_data, full, *args))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "eval_results.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step_000006", ignore_errors=True)
    recipe_main()(sft_args(tiny_lm, chat_data, resumed, *args, "train.resume_from=latest"))
    assert "resumed from" in capsys.readouterr().out
    assert max_difference(final_weights(resumed), final_weights(full)) == 0.0
    reset_accelerate_state()


def run_bad(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def test_bad_input_is_refused_before_the_model_loads(tiny_lm, chat_data, tmp_path, capsys):
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_lm, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    err = run_bad(sft_args(no_template, chat_data, tmp_path / "a"), capsys)
    assert "data.chat_template" in err
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "b", "data.format=prompt_completion"), capsys)
    assert "data.prompt_column" in err or "completion" in err
    err = run_bad(sft_args(tiny_lm, chat_data, tmp_path / "c", "data.max_length=100000"), capsys)
    assert "data.max_length" in err
    for name in "abc":
        assert not (tmp_path / name).exists(), "a refused run wrote its output dir"


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
    recipe_main()(["--config", str(demo), *overrides, f"output.dir={out}"])
    assert "done" in capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 3 and "exact_match" in results and results["tokens"] > 0
    assert len(read_jsonl(out / "generations" / "step_000003.jsonl")) == 3
    reset_accelerate_state()


def test_lora_run_saves_a_merged_generating_model_and_its_adapter(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "lora"
    recipe_main()(sft_args(tiny_lm, chat_data, out, "lora.enabled=true", "train.max_steps=2", "eval.num_generations=0"))
    assert "trainable" in capsys.readouterr().out
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    merged = final_weights(out)
    assert not any("lora" in key for key in merged), "final/ must be a plain transformers model"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    generated = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
    reset_accelerate_state()
