"""Checkpoints: atomic saves, keep-last/best, `latest`, refusing to lose work, and exact resume after
kill -9 and SIGTERM through `accelerate launch` (1 and 2 processes)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    CLASSIFY,
    REPO,
    assert_tensorboard_matches_metrics_log,
    launch,
    launch_command,
    read_jsonl,
    reset_accelerate_state,
)
from safetensors.torch import load_file

from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.run_dir import check_output_dir
from finetune.core.schemas import TrainConfig
from finetune.training.checkpoints.layout import (
    BEST_LINK,
    CHECKPOINTS_DIR,
    MODEL_DIR,
    PROGRESS_FILE,
    STATE_DIR,
    list_checkpoints,
    prune,
)
from finetune.training.checkpoints.resume import config_changes, resolve_resume, trim_metrics_log
from finetune.training.launch import make_accelerator

# --------------------------------------------------------------------------------------------
# Unit: finding, pruning, comparing
# --------------------------------------------------------------------------------------------


def fake_checkpoint(run: Path, step: int, metrics: dict | None = None, processes: int = 1, seed: int = 42) -> Path:
    path = run / CHECKPOINTS_DIR / f"step_{step:06d}"
    (path / "state").mkdir(parents=True)
    (path / "model").mkdir()
    (path / "model" / "config.json").write_text("{}")
    for rank in range(processes):
        (path / "state" / f"random_states_{rank}.pkl").write_bytes(b"")
    (path / "config.yaml").write_text(f"train:\n  seed: {seed}\n  lr: 0.001\neval:\n  batch_size: 8\n")
    progress = {"step": step, "epoch": 0, "batches_into_epoch": step, "num_processes": processes, "metrics": metrics}
    (path / PROGRESS_FILE).write_text(json.dumps(progress))
    return path


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_list_checkpoints_orders_by_step_and_skips_incomplete_with_a_warning(tmp_path: Path):
    for step in (100, 20, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / CHECKPOINTS_DIR / ".tmp-step_000200").mkdir()  # a save in progress, or killed mid-save
    unfinished = fake_checkpoint(tmp_path, 150)
    (unfinished / PROGRESS_FILE).unlink()
    corrupt = fake_checkpoint(tmp_path, 160)
    (corrupt / PROGRESS_FILE).write_text('{"step": 1')
    two_process = fake_checkpoint(tmp_path, 170, processes=2)
    (two_process / "state" / "random_states_1.pkl").unlink()
    with pytest.warns(UserWarning) as caught:
        found = list_checkpoints(tmp_path)
    assert names(found) == ["step_000003", "step_000020", "step_000100"]
    messages = " ".join(str(w.message) for w in caught)
    assert "step_000150" in messages and "did not finish" in messages
    assert "step_000160" in messages and "unreadable" in messages
    assert "step_000170" in messages and "random_states_1.pkl" in messages
    assert ".tmp" not in messages


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path):
    assert resolve_resume("latest", tmp_path) is None  # nothing saved yet: a fresh start
    assert resolve_resume(None, tmp_path) is None
    fake_checkpoint(tmp_path, 10)
    newest_complete = fake_checkpoint(tmp_path, 20)
    broken = fake_checkpoint(tmp_path, 30)
    (broken / "model" / "config.json").unlink()
    with pytest.warns(UserWarning, match="step_000030"):
        assert resolve_resume("latest", tmp_path) == newest_complete
    with pytest.warns(UserWarning):
        assert resolve_resume(str(tmp_path), tmp_path) == newest_complete  # a run dir: its newest
    with pytest.raises(UserError, match="not a complete checkpoint: missing model/config.json"):
        resolve_resume(str(broken), tmp_path)
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_prune_keeps_the_last_k_and_the_best(tmp_path: Path):
    accuracies = {10: 0.5, 20: 0.9, 30: 0.7, 40: 0.8, 50: float("nan"), 60: None}
    for step, accuracy in accuracies.items():
        fake_checkpoint(tmp_path, step, None if accuracy is None else {"accuracy": accuracy, "loss": step / 100})
    (tmp_path / CHECKPOINTS_DIR / ".tmp-step_000070").mkdir()  # left by a run killed mid-save
    prune(tmp_path, keep_last=2, metric="accuracy")
    assert names(list_checkpoints(tmp_path)) == ["step_000020", "step_000050", "step_000060"]
    link = tmp_path / CHECKPOINTS_DIR / BEST_LINK
    assert link.resolve().name == "step_000020"
    assert not (tmp_path / CHECKPOINTS_DIR / ".tmp-step_000070").exists()
    prune(tmp_path, keep_last=1, metric="loss")  # lower is better; NaN never best
    assert names(list_checkpoints(tmp_path)) == ["step_000020", "step_000060"]
    assert link.resolve().name == "step_000020"


def test_a_nan_metric_never_becomes_best(tmp_path: Path):
    fake_checkpoint(tmp_path, 10, {"loss": float("nan")})
    fake_checkpoint(tmp_path, 20, {"loss": math.inf})
    prune(tmp_path, keep_last=5, metric="loss")
    assert not (tmp_path / CHECKPOINTS_DIR / BEST_LINK).exists()
    fake_checkpoint(tmp_path, 30, {"loss": 2.0})
    prune(tmp_path, keep_last=5, metric="loss")
    assert (tmp_path / CHECKPOINTS_DIR / BEST_LINK).resolve().name == "step_000030"


def test_config_changes_name_only_run_defining_keys(tmp_path: Path):
    checkpoint = fake_checkpoint(tmp_path, 10)
    same = {"train": {"seed": 42, "lr": 0.001}, "eval": {"batch_size": 64}, "output": {"dir": "elsewhere"}}
    assert config_changes(checkpoint, same) == []
    changed = config_changes(checkpoint, {"train": {"seed": 1, "lr": 0.001}, "eval": {"batch_size": 8}})
    assert changed == ["train.seed: 42 -> 1"]


def test_trim_metrics_log_drops_records_after_the_checkpoint(tmp_path: Path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15, 20)))
    trim_metrics_log(log, 10)
    assert [r["step"] for r in read_jsonl(log)] == [5, 10]


def test_output_dir_holding_a_run_is_refused_unless_resuming_or_overwriting(tmp_path: Path):
    fake_checkpoint(tmp_path, 10)
    with pytest.raises(UserError, match="train.resume_from=latest"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=False, resuming=True)
    check_output_dir(tmp_path, overwrite=True)
    (tmp_path / "final").mkdir()
    with pytest.raises(UserError, match="a finished run"):
        check_output_dir(tmp_path, overwrite=False, fresh_if_unfinished=True)


def stepped_linear(accelerator, inputs: int, outputs: int):
    """A prepared Linear layer, AdamW and a constant LR schedule, after one optimizer step (AdamW state exists)."""
    model = torch.nn.Linear(inputs, outputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.ones(2, inputs, device=accelerator.device)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def test_state_round_trip_reads_torch_files_with_weights_only(tmp_path: Path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, _, _ = stepped_linear(accelerator, 4, 2)
    accelerator.save_state(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("pytorch_model*"))
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    accelerator.load_state(str(tmp_path))
    assert calls and all(flag is True for flag in calls), calls  # optimizer, scheduler, RNG states
    assert all(torch.equal(saved[name], t) for name, t in model.state_dict().items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpoint_state_holds_no_weights_and_loads_them_from_model_dir(tiny_bert, tmp_path, lora):
    """The weights are written once (model/), resumed bitwise from there; a LoRA checkpoint holds only the
    trainable weights, and refuses a base model whose frozen weights differ from the one it was trained on."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.core.modeling import apply_lora, write_model
    from finetune.core.schemas import LoraConfig

    def build(seed_offset: float = 0.0):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
        if seed_offset:
            with torch.no_grad():
                model.bert.embeddings.word_embeddings.weight.add_(seed_offset)
        return apply_lora(model, LoraConfig(enabled=True)) if lora else model

    reset_accelerate_state()
    accelerator, _ = make_accelerator(build_config(TrainConfig, [("test", {"micro_batch_size": 2})]))
    model = build()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "labels": torch.tensor([1])}
    model(**batch).loss.backward()
    optimizer.step()
    checkpoint = tmp_path / "step_000001"
    accelerator.save_state(str(checkpoint / STATE_DIR))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    write_model(accelerator, model, tokenizer, checkpoint / MODEL_DIR, 16, merge_lora=False)
    assert not [p.name for p in (checkpoint / STATE_DIR).iterdir() if "model" in p.name and p.suffix != ".json"]
    weights = list((checkpoint / MODEL_DIR).glob("*.safetensors"))
    assert [w.name for w in weights] == ["adapter_model.safetensors" if lora else "model.safetensors"]
    if lora:  # only the trainable weights, not the frozen base
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(load_file(weights[0])) == len(trainable) < len(list(model.parameters())) / 2
    trained = {name: t.clone() for name, t in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()["state"]

    with torch.no_grad():  # a later step changed everything; loading the checkpoint must undo it
        for param in model.parameters():
            param.add_(1.0)
    accelerator.load_state(str(checkpoint / STATE_DIR))
    changed = [n for n, t in model.state_dict().items() if not torch.equal(trained[n], t)]
    # with LoRA the frozen base is the model the run starts from: loading leaves it to the recipe's fresh load
    assert changed == ([n for n, p in model.named_parameters() if not p.requires_grad] if lora else [])
    loaded = optimizer.state_dict()["state"]
    assert all(torch.equal(optimizer_state[i]["exp_avg"], loaded[i]["exp_avg"]) for i in optimizer_state)

    if lora:  # a resume onto another base model: refused, naming what to do
        reset_accelerate_state()
        accelerator, _ = make_accelerator(build_config(TrainConfig, [("test", {"micro_batch_size": 2})]))
        other = build(seed_offset=0.5)
        other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1)
        other, other_optimizer = accelerator.prepare(other, other_optimizer)
        with pytest.raises(UserError, match="different base model"):
            accelerator.load_state(str(checkpoint / STATE_DIR))


def test_background_write_returns_before_the_disk_write_and_lands_the_same_checkpoint(tmp_path, monkeypatch):
    """checkpoint.background_write: `save` returns with the checkpoint staged in RAM; the thread lands it atomically
    with the same bytes a foreground save writes; a full /dev/shm falls back to the foreground; a failed disk write
    is raised by the next `wait`, leaving no checkpoint behind; nothing is left in /dev/shm."""
    import threading

    from finetune.training.checkpoints import writer as checkpoints
    from finetune.training.checkpoints.writer import CheckpointWriter
    from finetune.training.progress import Progress

    reset_accelerate_state()
    accelerator, _ = make_accelerator(build_config(TrainConfig, [("test", {"micro_batch_size": 2})]))
    torch.manual_seed(0)
    model, _, scheduler = stepped_linear(accelerator, 64, 64)

    def write_model(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        torch.save(accelerator.unwrap_model(model).state_dict(), target / "weights.pt")

    cfg = build_config(TrainConfig, [])
    progress = Progress(step=1, epoch=0, batches_into_epoch=2)

    def save(writer: CheckpointWriter, run: Path) -> Path:
        return writer.save(scheduler, run, progress, cfg, write_model, keep_last=2, metric_for_best="accuracy")

    foreground = save(CheckpointWriter(accelerator, background=False), tmp_path / "foreground")
    writer = CheckpointWriter(accelerator, background=True)
    if writer.staging_root is None:
        pytest.skip("no writable /dev/shm on this machine: checkpoints are written in the foreground")
    staged_before = set(writer.staging_root.glob(f"{checkpoints.STAGING_PREFIX}*"))

    copy, may_copy = shutil.copytree, threading.Event()
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: may_copy.wait(60) and copy(*a, **k))
    background = save(writer, tmp_path / "background")
    assert not background.exists(), "save returned only after the disk write"
    may_copy.set()
    writer.wait()

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(background).keys() == files(foreground).keys()
    for name in ("state/optimizer.bin", "state/scheduler.bin", "model/weights.pt", "state/random_states_0.pkl"):
        assert files(background)[name] == files(foreground)[name], name  # the same tensors, pickled alike
    assert set(writer.staging_root.glob(f"{checkpoints.STAGING_PREFIX}*")) == staged_before, "staging left behind"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def staging_fills_up(target: Path) -> None:  # /dev/shm taken by something else after the room was checked
        if target.is_relative_to(writer.staging_root):
            raise OSError(28, "No space left on device")
        write_model(target)

    with pytest.warns(UserWarning, match="could not be staged in RAM"):
        staged_failed = writer.save(
            scheduler, tmp_path / "staging full", progress, cfg, staging_fills_up, 2, "accuracy"
        )
    assert files(staged_failed).keys() == files(foreground).keys(), "written in the foreground instead"
    assert set(writer.staging_root.glob(f"{checkpoints.STAGING_PREFIX}*")) == staged_before

    import psutil

    with monkeypatch.context() as patched:  # no room in RAM: the foreground, said once
        patched.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**30})())
        with pytest.warns(UserWarning, match="checkpoints are written in the foreground"):
            no_room = save(writer, tmp_path / "no room")
        assert (no_room / PROGRESS_FILE).is_file(), "complete when save returns"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            save(writer, tmp_path / "no room 2")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    failed = save(writer, run := tmp_path / "failed")
    with pytest.raises(UserError, match="a checkpoint could not be written: .*No space left on device"):
        writer.wait()
    assert not failed.exists() and not list_checkpoints(run, warn=False)
    assert set(writer.staging_root.glob(f"{checkpoints.STAGING_PREFIX}*")) == staged_before
    writer.wait()  # raised once


# --------------------------------------------------------------------------------------------
# Through the recipe: kill -9, SIGTERM, resume bitwise
# --------------------------------------------------------------------------------------------

CHECKPOINT_EVERY = 10


def run_args(tiny_bert: Path, toy_data: dict, output_dir: Path, *extra: str) -> list[str]:
    """30 optimizer steps per epoch (240 examples, micro-batch 4 x accumulation 2), dropout on."""
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=5",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=2",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "eval.batch_size=8",
        f"checkpoint.every_n_steps={CHECKPOINT_EVERY}",
        "checkpoint.keep_last=2",
        "logging.every_n_steps=1",
        "logging.progress_bar=never",
        f"output.dir={output_dir}",
        *extra,
    ]


def run_to_end(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    result = launch(CLASSIFY, args, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(args: list[str], processes: int, sig: int, after_step: int, output_dir: Path) -> tuple[str, int]:
    """Start a run; once it has logged `after_step` (past a checkpoint, most likely inside an
    accumulation window), send `sig` to the launcher and every process it started, as a scheduler
    would. Returns (stdout, steps logged before the run ended)."""
    cmd, env = launch_command(CLASSIFY, args, processes)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and any(r.get("step", 0) >= after_step for r in read_jsonl(log))):
        assert proc.poll() is None, f"the run ended before step {after_step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tree = [proc_ := psutil.Process(proc.pid), *proc_.children(recursive=True)]
    for process in tree:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=120)
    stdout = proc.communicate(timeout=120)[0]
    return stdout, max(r["step"] for r in read_jsonl(log))


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_file(run_a / "final" / "model.safetensors"), load_file(run_b / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [name for name in a if not (a[name] == b[name]).all()]
    assert not different, f"not bitwise equal: {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(run_args(tiny_bert, toy_data, output_dir))
    return output_dir


@pytest.mark.recipe
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


@pytest.mark.recipe
def test_resume_latest_of_a_finished_run_does_nothing(reference_run: Path):
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}
    config = ["--config", str(reference_run / "config.yaml"), "train.resume_from=latest"]
    result = launch(CLASSIFY, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds a finished run: nothing to resume" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()} == before


@pytest.mark.recipe
def test_finetune_eval_scores_each_checkpoint_as_training_evaluated_it(reference_run: Path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune.scoring", str(reference_run)], cwd=REPO, capture_output=True, text=True
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
        [sys.executable, "-m", "finetune.scoring", str(best)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((best.resolve() / "eval" / "eval_results.json").read_text())
    assert scored["step"] == int(best.resolve().name.split("_")[1])


@pytest.mark.recipe
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


@pytest.mark.recipe
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


@pytest.mark.recipe
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


@pytest.mark.recipe
def test_a_nonfinite_loss_stops_the_run_naming_the_step(tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, "train.optimizer=sgd", "train.lr=1e30", "train.max_grad_norm=null")
    result = launch(CLASSIFY, args)
    assert result.returncode != 0
    assert "not finite" in result.stderr and "at optimizer step" in result.stderr
    assert "train.on_nonfinite_loss=skip" in result.stderr
    assert not (output_dir / "final").exists()
    assert not list_checkpoints(output_dir, warn=False), "a NaN run never leaves a checkpoint behind"


@pytest.mark.recipe
def test_skip_mode_drops_nonfinite_steps_and_finishes(tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    diverging = ["train.optimizer=sgd", "train.lr=1e30", "train.max_grad_norm=null", "train.epochs=1"]
    result = launch(CLASSIFY, run_args(tiny_bert, toy_data, output_dir, *diverging, "train.on_nonfinite_loss=skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the loss is not finite; update skipped" in result.stdout
    weights = load_file(output_dir / "final" / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values()), "a skipped step never applies its update"


@pytest.mark.recipe
@pytest.mark.multiprocess
def test_kill_9_then_resume_with_two_processes_from_an_epoch_end_checkpoint(tiny_bert, toy_data, tmp_path):
    """2 processes x micro-batch 4 x accumulation 2: 15 steps per epoch; checkpoints at epoch ends only."""
    settings = [
        "data.group_by_length=false",  # the other sampler: Accelerate's seedable random sampler
        "train.epochs=3",
        "checkpoint.every_n_steps=null",
        "checkpoint.at_epoch_end=true",
    ]
    reference = tmp_path / "reference"
    run_to_end(run_args(tiny_bert, toy_data, reference, *settings), processes=2)
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, *settings)
    interrupt(args, 2, signal.SIGKILL, after_step=20, output_dir=output_dir)
    assert not (output_dir / "final").exists()
    latest = list_checkpoints(output_dir)[-1]
    progress = json.loads((latest / PROGRESS_FILE).read_text())
    assert progress["step"] in (15, 30) and progress["step"] < 45  # an epoch end, not the last step
    assert (progress["epoch"], progress["batches_into_epoch"]) == (progress["step"] // 15, 0)
    run_to_end([*args, "train.resume_from=latest"], processes=2)
    assert_same_weights(reference, output_dir)


@pytest.mark.recipe
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
        [sys.executable, "-m", "finetune.scoring", str(checkpoint)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((checkpoint / "eval" / "eval_results.json").read_text())
    at_step = json.loads((checkpoint / PROGRESS_FILE).read_text())["metrics"]
    assert scored["accuracy"] == at_step["accuracy"]
    assert scored["loss"] == pytest.approx(at_step["loss"], rel=1e-5)


@pytest.mark.recipe
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
