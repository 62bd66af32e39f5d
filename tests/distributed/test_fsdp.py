"""FSDP2 with the shipped accelerate_configs/fsdp.yaml, on 2 CPU processes over gloo (finetune/core/fsdp.py makes
Accelerate run it as FSDP2 rather than DDP): BERT and LLaMA train, checkpoints hold full models and resume bitwise
after kill -9, and one sharded optimizer step equals the unsharded one (tied and untied LM heads; the script
tests/distributed/fsdp_one_step.py). The adjustments before `prepare`, in one process: tests/unit/test_fsdp.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFY, REPO, assert_same_weights, interrupt, launch, run_args, tiny_llama_config

from finetune.training.checkpoints.layout import PROGRESS_FILE, list_checkpoints

FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp.yaml"

PROCESSES = 2

# 2 processes x micro-batch 4 x accumulation 2 = 16 examples a step: 15 steps an epoch; checkpoints every 10.
SETTINGS = ["train.epochs=2", "data.group_by_length=false"]

ONE_STEP = Path(__file__).with_name("fsdp_one_step.py")


@pytest.fixture(autouse=True)
def cpu_processes(monkeypatch):
    """Launch on CPU (on a GPU machine too: the GPUs hidden) with the shipped FSDP config."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def launch_fsdp(script: Path, args: list[str]):
    result = launch(script, args, processes=PROCESSES, config_file=FSDP_CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_llama(path: Path, tokenizer_dir: Path, tie: bool) -> Path:
    """The tests' tiny LLaMA (helpers.tiny_llama_config) with random weights and the tokenizer of `tokenizer_dir`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llamas(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llama")
    return {name: tiny_llama(root / name, tiny_bert, tie=name == "tied") for name in ("tied", "untied")}


@pytest.fixture(scope="module")
def fsdp_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("fsdp") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "true")
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        launch_fsdp(CLASSIFY, run_args(tiny_bert, toy_data, output_dir, *SETTINGS))
    return output_dir


def assert_full_transformers_model(path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, pipeline

    _, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    prediction = pipeline("text-classification", model=str(path), device="cpu")("apple pear plum", truncation=True)
    assert prediction[0]["label"] in {"fruit", "vehicle", "animal"}


def test_fsdp_run_trains_and_saves_full_models_and_full_state(fsdp_run):
    results = json.loads((fsdp_run / "eval_results.json").read_text())
    assert results["step"] == 30 and results["accuracy"] > 0.5 and results["loss"] < 1.0  # chance: 1/3, ln 3
    checkpoint = list_checkpoints(fsdp_run)[-1]
    assert checkpoint.name == "step_000020"
    # fsdp_state_dict_type FULL_STATE_DICT: the whole model and optimizer state, gathered on the first process
    # (a DDP run writes its weights once, in model/: see finetune.training.checkpoints.weights.keep_weights_once).
    state = {p.name for p in (checkpoint / "state").iterdir()}
    rng = {"random_states_0.pkl", "random_states_1.pkl"}
    assert state == {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.bin", *rng}
    assert_full_transformers_model(fsdp_run / "final")
    assert_full_transformers_model(checkpoint / "model")


def test_fsdp_kill_9_then_resume_equals_the_uninterrupted_run(fsdp_run, tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, *SETTINGS)
    interrupt(args, PROCESSES, signal.SIGKILL, after_step=13, output_dir=output_dir, config_file=FSDP_CONFIG)
    assert not (output_dir / "final").exists()
    assert json.loads((list_checkpoints(output_dir)[-1] / PROGRESS_FILE).read_text())["step"] == 10
    resumed = launch_fsdp(CLASSIFY, [*args, "train.resume_from=latest"])
    assert "resumed from" in resumed.stdout and "step_000010" in resumed.stdout
    assert_same_weights(fsdp_run, output_dir)


def test_llama_classifier_trains(tiny_llamas, toy_data, tmp_path):
    """LlamaForSequenceClassification from a tied-embedding checkpoint (its head is `score`, not tied)."""
    output_dir = tmp_path / "run"
    args = run_args(tiny_llamas["tied"], toy_data, output_dir, "train.max_steps=6", "checkpoint.every_n_steps=null")
    launch_fsdp(CLASSIFY, args)
    assert json.loads((output_dir / "eval_results.json").read_text())["step"] == 6
    assert_full_transformers_model(output_dir / "final")


def test_one_sharded_step_equals_the_unsharded_step(tiny_llamas, tiny_bert):
    """LlamaForCausalLM with tied and untied embeddings (the SFT case) and a BERT classifier whose fresh head
    the second process holds on the meta device until `prepare`."""
    specs = [f"causal:{tiny_llamas['tied']}", f"causal:{tiny_llamas['untied']}", f"classify:{tiny_bert}"]
    result = launch_fsdp(ONE_STEP, specs)
    for spec in specs:
        assert result.stdout.count(f"same step: {spec}") == PROCESSES, result.stdout[-3000:]
