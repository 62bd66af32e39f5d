"""finetune.training.loop.fit, the loop's policy, in-process on a tiny LLaMA with a scripted evaluation: stop at
the last step, the log and evaluation cadences, periodic checkpoints, early stopping with the best model back in
memory, a stop signal's checkpoint and exit, a non-finite loss stopped or skipped."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import make_tokenizer, reset_accelerate_state, tiny_llama_config

from finetune.core.config import load_config
from finetune.core.errors import UserError
from finetune.core.run_dir import RunDir
from finetune.core.schemas import SFTConfig
from finetune.training.accumulation import count_next_token_terms
from finetune.training.batches import Loaders
from finetune.training.checkpoints.layout import list_checkpoints, read_progress
from finetune.training.loop import Task, fit
from finetune.training.run import Run, launch, start_run


def next_token_loss(model, batch):
    """The summed next-token loss of a batch, the recipe's contract (finetune.lm.loss.next_token_loss)."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )


def start(tmp_path, *overrides: str, loss=next_token_loss):
    """A Run over 32 random 12-token rows (micro-batch 4: 8 optimizer steps an epoch) and a tiny LLaMA, ready to fit."""
    reset_accelerate_state()
    argv = [
        f"output.dir={tmp_path / 'run'}",
        "model.name_or_path=unused",
        "data.train=unused.jsonl",
        "train.micro_batch_size=4",
        "train.epochs=1",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "checkpoint.background_write=false",
        "logging.trackers=[]",
        "logging.progress_bar=never",
        *overrides,
    ]
    cfg = load_config(SFTConfig, argv, None, prog="test")
    run = Run(cfg=cfg, script="recipes/sft.py", argv=argv, dir=RunDir(cfg.output.dir), resume_from=None)
    launch(run, model_config=None, auto_class=None)  # no quantization: the model's config is not read
    start_run(run)
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    rows = torch.randint(8, len(tokenizer), (32, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row.clone()} for row in rows]
    train = run.accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=4))
    return run, model, optimizer, tokenizer, Loaders(train, None)


def scripted(values: list[float], metric: str = "loss"):
    """An evaluation returning the next of `values` (and recording the steps it was called at)."""
    calls: list[int] = []

    def evaluate(step: int) -> dict:
        calls.append(step)
        return {metric: values[min(len(calls), len(values)) - 1]}

    evaluate.calls = calls
    return evaluate


def fit_run(tmp_path, *overrides, evaluate=None, loss=next_token_loss):
    run, model, optimizer, tokenizer, loaders = start(tmp_path, *overrides)
    evaluate = evaluate or scripted([1.0])
    outcome = fit(
        run, model, optimizer, tokenizer, loaders.train, Task(loss, count_next_token_terms, evaluate), "32 rows"
    )
    return run, model, outcome, evaluate


def logged(run: Run) -> list[dict]:
    return [json.loads(line) for line in run.dir.metrics.read_text().splitlines()]


def test_stops_at_max_steps_logs_evaluates_and_checkpoints_on_their_cadence(tmp_path):
    run, _, outcome, evaluate = fit_run(
        tmp_path,
        "train.max_steps=7",
        "logging.every_n_steps=3",
        "eval.every_n_steps=4",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=10",
    )
    assert outcome.progress.step == 7 and outcome.step == 7
    # evaluations: every 4 steps, before each periodic checkpoint (every 2), and the final one after the last step
    assert evaluate.calls == [2, 4, 6, 7]
    records = logged(run)
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 7]  # every 3 steps, and the last
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6, 7]
    # no periodic checkpoint at the last step: final/ is written by the run's end instead
    assert [read_progress(p).step for p in list_checkpoints(run.dir.root)] == [2, 4, 6]
    assert outcome.early_stopping is None


def test_early_stopping_stops_after_patience_and_restores_the_best_model(tmp_path):
    # lower is better for loss: the best at step 2, then two evaluations without improvement (a tie included)
    evaluate = scripted([0.9, 0.5, 0.6, 0.5, 0.1])
    run, model, outcome, _ = fit_run(
        tmp_path,
        "eval.every_n_steps=1",
        "train.early_stopping_patience=2",
        "checkpoint.every_n_steps=null",
        evaluate=evaluate,
    )
    assert evaluate.calls == [1, 2, 3, 4]  # stopped after step 4, no final evaluation on top
    assert outcome.progress.step == 4
    assert outcome.early_stopping["stopped_early"] is True and outcome.early_stopping["best_step"] == 2
    # the model in memory is the best checkpoint's (the earlier of a tie), with that evaluation's metrics
    assert outcome.step == 2 and outcome.metrics == {"loss": 0.5}
    best = run.dir.best.resolve()
    assert read_progress(best).step == 2
    from safetensors.torch import load_file

    saved = load_file(best / "model" / "model.safetensors")
    state = run.accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_a_stop_signal_saves_a_checkpoint_and_exits_with_the_resume_command(tmp_path, capsys):
    def evaluate(step: int) -> dict:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would, mid-run
        return {"loss": 1.0}

    with pytest.raises(SystemExit) as exit_info:
        fit_run(tmp_path, "eval.every_n_steps=1", "checkpoint.every_n_steps=null", evaluate=evaluate)
    assert exit_info.value.code == 128 + signal.SIGTERM
    checkpoints = list_checkpoints(tmp_path / "run")
    # the signal arrived during step 3's evaluation: the run stops after step 4, its checkpoint complete
    assert [read_progress(p).step for p in checkpoints] == [4]
    assert read_progress(checkpoints[0]).reason == "preempted"
    assert "train.resume_from=latest" in capsys.readouterr().out


def nan_at_step_3(model, batch, calls=[0]):  # noqa: B006  (a counter across calls)
    calls[0] += 1
    loss = next_token_loss(model, batch)
    return loss * float("nan") if calls[0] == 3 else loss


def test_a_non_finite_loss_stops_the_run_or_skips_the_update(tmp_path):
    with pytest.raises(UserError, match="not finite"):
        fit_run(tmp_path / "stop", "train.max_steps=4", loss=lambda m, b, c=[0]: nan_at_step_3(m, b, c))
    run, model, outcome, _ = fit_run(
        tmp_path / "skip",
        "train.max_steps=4",
        "train.on_nonfinite_loss=skip",
        loss=lambda m, b, c=[0]: nan_at_step_3(m, b, c),
    )
    assert outcome.progress.step == 4  # the skipped step still counts: the schedule and the data move on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(torch.tensor(outcome.metrics["loss"]))
