"""Checkpoints through `accelerate launch` of recipes/classify.py: keep-last/best, `latest`, exact resume after kill -9
and SIGTERM, refusing a changed run, non-finite losses, LoRA and early stopping. (The pieces, in one process:
tests/unit/test_checkpoints.py; kill -9 with two processes: tests/distributed/test_multiprocess.py.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CHECKPOINT_EVERY,
    CLASSIFY,
    REPO,
    assert_same_weights,
    assert_tensorboard_matches_metrics_log,
    interrupt,
    launch,
    read_jsonl,
    run_args,
    run_to_end,
)
from safetensors.torch import load_file

from finetune.training.checkpoints.layout import BEST_LINK, CHECKPOINTS_DIR, PROGRESS_FILE, list_checkpoints


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def reference_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(run_args(tiny_bert, toy_data, output_dir))
    return output_dir


def test_checkpoints_keep_the_last_two_and_the_best(reference_run: Path):
    kept = list_checkpoints(reference_run)
    assert names(kept)[-2:] == ["step_000130", "step_000140"]  # 150 steps; none after the last (final/ is)
    best = (reference_run / CHECKPOINTS_DIR / BEST_LINK).resolve()
    progress = {p.name: json.loads((p / PROGRESS_FILE).read_text()) for p in kept}
    best_accuracy = max(p["metrics"]["accuracy"] for p in progress.values())
    assert progress[best.name]["metrics"]["accuracy"] == best_accuracy
    assert len(kept) == 2 + (best.name not in names(kept)[-2:])
    evaluated = [r["step"] for r in read_jsonl(reference_run / "metrics.jsonl") if "eval_accuracy" in r]
    assert evaluated == [*range(CHECKPOINT_EVERY, 150, CHECKPOINT_EVERY), 150]  # every checkpoint is scored
    state = {p.name for p in (kept[-1] / "state").iterdir()}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= state
    assert not [name for name in state if "model" in name], "the weights are written once, in model/"
    assert (kept[-1] / "model" / "model.safetensors").is_file()  # what finetune-eval scores and resume loads


def test_resume_latest_of_a_finished_run_does_nothing(reference_run: Path):
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}
    config = ["--config", str(reference_run / "config.yaml"), "train.resume_from=latest"]
    result = launch(CLASSIFY, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds a finished run: nothing to resume" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()} == before


def test_finetune_eval_scores_each_checkpoint_as_training_evaluated_it(reference_run: Path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune.eval", str(reference_run)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((reference_run / "eval" / "leaderboard.json").read_text())
    kept = names(list_checkpoints(reference_run))
    assert sorted(row["model"] for row in board) == sorted([*kept, "final"])
    for row in board:
        if row["model"] != "final":
            at_step = json.loads((reference_run / CHECKPOINTS_DIR / row["model"] / PROGRESS_FILE).read_text())
            assert row["accuracy"] == at_step["metrics"]["accuracy"]
            assert row["loss"] == pytest.approx(at_step["metrics"]["loss"], rel=1e-5)
    best_row = next(row for row in board if row["best"])
    assert best_row["accuracy"] == max(row["accuracy"] for row in board)
    best = reference_run / CHECKPOINTS_DIR / BEST_LINK
    result = subprocess.run(
        [sys.executable, "-m", "finetune.eval", str(best)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((best.resolve() / "eval" / "eval_results.json").read_text())
    assert scored["step"] == int(best.resolve().name.split("_")[1])


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference_run, tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir)
    _, last_logged = interrupt(args, 1, signal.SIGKILL, after_step=4 * CHECKPOINT_EVERY + 3, output_dir=output_dir)
    assert not (output_dir / "final").exists() and last_logged < 150
    # A checkpoint dir whose save never finished must be passed over by `latest`.
    broken = output_dir / CHECKPOINTS_DIR / "step_000999"
    broken.mkdir()
    (broken / PROGRESS_FILE).write_text('{"step": 9')
    refused = launch(CLASSIFY, args)
    assert refused.returncode != 0 and "train.resume_from=latest" in refused.stderr
    resumed = run_to_end([*args, "train.resume_from=latest"])
    assert "ignoring checkpoint" in resumed.stderr and "step_000999" in resumed.stderr
    resumed_at = int(re.search(r"resumed from \S+step_(\d+)", resumed.stdout).group(1))
    assert 4 * CHECKPOINT_EVERY <= resumed_at <= last_logged and resumed_at % CHECKPOINT_EVERY == 0
    assert_same_weights(reference_run, output_dir)
    steps = [r["step"] for r in read_jsonl(output_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 151)), "the log keeps no record from after the checkpoint that was redone"
    assert_tensorboard_matches_metrics_log(output_dir)  # the killed run's last records purged there too


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_saves_a_checkpoint_that_resumes_exactly(sig, reference_run, tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir)
    stdout, last_logged = interrupt(args, 1, sig, after_step=25, output_dir=output_dir)
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step {last_logged}" in stdout
    assert "train.resume_from=latest" in stdout.split(f"stopped by {name}")[1]
    saved = output_dir / CHECKPOINTS_DIR / f"step_{last_logged:06d}"
    assert json.loads((saved / PROGRESS_FILE).read_text())["reason"] == "preempted"
    run_to_end([*args, "train.resume_from=latest"])
    assert_same_weights(reference_run, output_dir)


def test_resume_refuses_a_changed_run_and_a_damaged_checkpoint(reference_run, tmp_path):
    output_dir = tmp_path / "new"
    same_config = ["--config", str(reference_run / "config.yaml"), f"output.dir={output_dir}"]
    checkpoint = list_checkpoints(reference_run)[-1]
    changed = launch(CLASSIFY, [*same_config, f"train.resume_from={checkpoint}", "train.seed=7"])
    assert changed.returncode != 0
    assert "train.seed: 42 -> 7" in changed.stderr and "train.resume_allow_changes=true" in changed.stderr
    assert not output_dir.exists(), "nothing is written before the checks pass"

    damaged = shutil.copytree(checkpoint, tmp_path / "damaged" / checkpoint.name)
    weights = damaged / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = launch(CLASSIFY, [*same_config, f"train.resume_from={damaged}"])
    assert result.returncode != 0
    assert f"could not load checkpoint {damaged}" in result.stderr
    assert not (output_dir / "final").exists()


def test_a_nonfinite_loss_stops_the_run_naming_the_step(tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, "train.optimizer=sgd", "train.lr=1e30", "train.max_grad_norm=null")
    result = launch(CLASSIFY, args)
    assert result.returncode != 0
    assert "not finite" in result.stderr and "at optimizer step" in result.stderr
    assert "train.on_nonfinite_loss=skip" in result.stderr
    assert not (output_dir / "final").exists()
    assert not list_checkpoints(output_dir, warn=False), "a NaN run never leaves a checkpoint behind"


def test_skip_mode_drops_nonfinite_steps_and_finishes(tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    diverging = ["train.optimizer=sgd", "train.lr=1e30", "train.max_grad_norm=null", "train.epochs=1"]
    result = launch(CLASSIFY, run_args(tiny_bert, toy_data, output_dir, *diverging, "train.on_nonfinite_loss=skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the loss is not finite; update skipped" in result.stdout
    weights = load_file(output_dir / "final" / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values()), "a skipped step never applies its update"


def test_lora_run_resumes_bitwise_and_its_checkpoints_score(tiny_bert, toy_data, tmp_path):
    """A LoRA checkpoint: full state in state/, the adapter (+ config.json) in model/ for finetune-eval."""
    lora = ["lora.enabled=true", "train.epochs=2", "checkpoint.keep_last=5"]
    full = tmp_path / "full"
    run_to_end(run_args(tiny_bert, toy_data, full, *lora))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / CHECKPOINTS_DIR / "step_000020", resumed / CHECKPOINTS_DIR / "step_000020")
    run_to_end([*run_args(tiny_bert, toy_data, resumed, *lora), "train.resume_from=latest"])
    assert_same_weights(full, resumed)
    checkpoint = full / CHECKPOINTS_DIR / "step_000020"
    assert (checkpoint / "model" / "adapter_model.safetensors").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "finetune.eval", str(checkpoint)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((checkpoint / "eval" / "eval_results.json").read_text())
    at_step = json.loads((checkpoint / PROGRESS_FILE).read_text())["metrics"]
    assert scored["accuracy"] == at_step["accuracy"]
    assert scored["loss"] == pytest.approx(at_step["loss"], rel=1e-5)


def test_early_stopping_keeps_the_best_model_and_resumes_its_count(tiny_bert, toy_data, tmp_path):
    """A learning rate too small to change a prediction: accuracy never improves on the first evaluation, so
    with patience 3 and an evaluation every 10 steps the run stops after step 40 with final/ = the step-10 model.
    Interrupted at step 12 and resumed, it stops at the same step: the count lives in the checkpoint."""
    stopping = [
        "train.lr=1e-9",
        "eval.every_n_steps=10",
        "train.early_stopping_patience=3",
        "checkpoint.every_n_steps=null",
    ]
    whole = tmp_path / "whole"
    run_to_end(run_args(tiny_bert, toy_data, whole, *stopping))
    results = json.loads((whole / "eval_results.json").read_text())
    assert results["early_stopping"] == {
        "stopped_early": True, "step": 40, "best_step": 10, "metric": "accuracy",
        "best_value": results["accuracy"], "patience": 3, "min_delta": 0.0,
    }  # fmt: skip
    assert results["step"] == 10, "final/ holds the best evaluated model and says so"
    assert max(r["step"] for r in read_jsonl(whole / "metrics.jsonl")) == 40
    best = (whole / CHECKPOINTS_DIR / "best").resolve()
    assert best.name == "step_000010"
    final, saved = load_file(whole / "final" / "model.safetensors"), load_file(best / "model" / "model.safetensors")
    assert all(torch.equal(final[name], saved[name]) for name in saved)

    resumed = tmp_path / "resumed"
    args = run_args(tiny_bert, toy_data, resumed, *stopping)
    _, last_logged = interrupt(args, 1, signal.SIGTERM, after_step=12, output_dir=resumed)
    assert last_logged < 40
    run_to_end([*args, "train.resume_from=latest"])
    again = json.loads((resumed / "eval_results.json").read_text())
    assert again["early_stopping"] == results["early_stopping"]
    assert_same_weights(whole, resumed)
