"""QLoRA through the recipes, CPU-checked (bitsandbytes' x86 kernels): 4-bit base weights with LoRA and 8-bit AdamW
learn, resume bitwise after kill -9, merge onto the dequantized base, score with finetune-eval, and the levers that
cannot work are refused before any weights load. (The pieces in one process: tests/unit/test_quantization.py.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    REPO,
    SFT,
    assert_same_weights,
    interrupt,
    read_jsonl,
    recipe_main,
    reset_accelerate_state,
    run_args,
    run_bad,
    run_to_end,
    sft_args,
)
from transformers import AutoConfig, pipeline

import finetune.classify.model
import finetune.core.modeling
from finetune.training.checkpoints.layout import BASE_MODEL_FILE, CHECKPOINTS_DIR, PROGRESS_FILE, STATE_DIR

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs .[quant]")

# fp32 on a CPU: the same weights, summed in another order; a GPU may compute fp32 matmuls in TF32.
MERGE_BOUND = 1e-4 if not torch.cuda.is_available() else 2e-2

QLORA = ["lora.enabled=true", "model.quantization=nf4", "train.optimizer=adamw_8bit", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def qlora_run(tiny_bert, toy_data, tmp_path_factory):
    """recipes/classify.py with QLoRA (nf4, double quantization) and 8-bit AdamW: 30 steps, a checkpoint every 10."""
    output_dir = tmp_path_factory.mktemp("qlora") / "run"
    run_to_end(run_args(tiny_bert, toy_data, output_dir, *QLORA, "train.epochs=1", "checkpoint.keep_last=6"))
    return output_dir


def test_kill_9_then_resume_of_a_qlora_run_with_8bit_adamw_is_bitwise(qlora_run, tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "killed"
    args = run_args(tiny_bert, toy_data, output_dir, *QLORA, "train.epochs=1", "checkpoint.keep_last=6")
    _, last_step = interrupt(args, processes=1, sig=signal.SIGKILL, after_step=15, output_dir=output_dir)
    assert last_step < 30
    run_to_end([*args, "train.resume_from=latest"])
    assert_same_weights(qlora_run, output_dir)  # the merged final/ of both
    base = json.loads((qlora_run / CHECKPOINTS_DIR / "step_000010" / STATE_DIR / BASE_MODEL_FILE).read_text())
    assert base["quantization"]["bnb_4bit_quant_type"] == "nf4" and base["frozen_weights_xxh3_128"]
    model_dir = qlora_run / CHECKPOINTS_DIR / "step_000010" / "model"
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["adapter_model.safetensors"]  # adapter only


def test_final_is_merged_onto_the_dequantized_base_and_classifies(qlora_run):
    results = json.loads((qlora_run / "eval_results.json").read_text())
    gap = results["merged_model"]
    assert gap["batches"] >= 1 and gap["max_logit_difference"] < MERGE_BOUND * max(1.0, gap["max_abs_logit"])
    assert "quantization_config" not in json.loads((qlora_run / "final" / "config.json").read_text())
    classifier = pipeline("text-classification", model=str(qlora_run / "final"), device="cpu")
    assert classifier("apple pear plum")[0]["label"] in {"animal", "fruit", "vehicle"}
    losses = [r["loss"] for r in read_jsonl(qlora_run / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learned


def test_finetune_eval_scores_the_run_its_adapter_checkpoints_and_the_merged_model(qlora_run):
    result = subprocess.run(
        [sys.executable, "-m", "finetune.eval", str(qlora_run)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((qlora_run / "eval" / "leaderboard.json").read_text())
    names = [row["model"] for row in board["rows"]] if isinstance(board, dict) else [row["model"] for row in board]
    assert "final" in names and "step_000020" in names
    # an adapter checkpoint is scored on the base quantized as it was trained: as training evaluated it
    scored = json.loads((qlora_run / "eval" / "step_000020" / "eval_results.json").read_text())
    at_step = json.loads((qlora_run / CHECKPOINTS_DIR / "step_000020" / PROGRESS_FILE).read_text())["metrics"]
    if "loss" in at_step:
        assert scored["loss"] == pytest.approx(at_step["loss"], rel=1e-4)
    final = json.loads((qlora_run / "eval" / "final" / "eval_results.json").read_text())
    assert final["accuracy"] == json.loads((qlora_run / "eval_results.json").read_text())["accuracy"]


def test_resuming_on_another_quantization_is_refused(qlora_run, tiny_bert, toy_data, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(qlora_run / CHECKPOINTS_DIR / "step_000010", resumed / CHECKPOINTS_DIR / "step_000010")
    args = run_args(tiny_bert, toy_data, resumed, *QLORA, "train.epochs=1", "train.resume_from=latest")
    err = run_bad([*args, "model.quantization=int8", "train.resume_allow_changes=true"], capsys)
    assert "was trained on a base quantized as" in err and "model.quantization" in err
    reset_accelerate_state()


def test_qlora_sft_learns_merges_and_generates_through_pipeline(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "sft"
    args = sft_args(tiny_lm, chat_data, out, *QLORA, "model.quantization=fp4", "train.epochs=3", "train.lr=1e-2")
    recipe_main(SFT)(args)
    reset_accelerate_state()
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4])
    results = json.loads((out / "eval_results.json").read_text())
    gap = results["merged_model"]
    assert gap["max_logit_difference"] < MERGE_BOUND * max(1.0, gap["max_abs_logit"])
    assert AutoConfig.from_pretrained(out / "final").to_dict().get("quantization_config") is None
    generator = pipeline("text-generation", model=str(out / "final"), device="cpu")
    reply = generator([{"role": "user", "content": "reverse abc"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def never_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded before the refusal")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.quantization=nf4"], "model.quantization=nf4 needs lora.enabled=true"),
        (["lora.enabled=true", "train.optimizer=paged_adamw_8bit"], "paged_adamw_8bit pages its states"),
        (["train.activation_offload=true"], "train.activation_offload=true moves activations"),
    ],
)
def test_levers_that_cannot_work_here_exit_2_before_loading(
    extra, message, tiny_lm, chat_data, tiny_bert, toy_data, tmp_path, capsys, monkeypatch
):
    if torch.cuda.is_available() and "model.quantization" not in extra[0]:
        pytest.skip("paged 8-bit AdamW and activation offload work on a GPU (tests/gpu/test_gpu.py runs them)")
    monkeypatch.setattr(finetune.core.modeling, "load_causal_lm", never_loaded)
    monkeypatch.setattr(finetune.classify.model, "load_classifier", never_loaded)
    assert message in run_bad(sft_args(tiny_lm, chat_data, tmp_path / "sft", *extra), capsys, SFT)
    assert message in run_bad(run_args(tiny_bert, toy_data, tmp_path / "classify", *extra), capsys)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "classify").exists()
    reset_accelerate_state()


def test_dry_run_names_the_levers_and_counts_the_quantized_weights(tiny_lm, chat_data, tmp_path, capsys):
    out = tmp_path / "dry"
    args = sft_args(tiny_lm, chat_data, out, *QLORA, "train.gradient_checkpointing=true", "--dry-run")
    recipe_main(SFT)(args)
    reset_accelerate_state()
    printed = capsys.readouterr().out
    assert "memory levers: nf4 base weights, double-quantized, LoRA r=8, adamw_8bit optimizer" in printed
    assert "gradient checkpointing, chunked loss" in printed
    assert "nf4 base: 14 linear layers" in printed and "8-bit AdamW (bitsandbytes)" in printed
    assert not out.exists()
