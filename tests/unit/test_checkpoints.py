"""Checkpoint pieces (finetune.training.checkpoints): finding and pruning checkpoints, `latest`, comparing configs,
refusing to lose work, the state round trip, weights written once, background writes. The recipe's own
checkpoints, kill -9 and resume are in tests/recipes/test_checkpoints.py."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import read_jsonl, reset_accelerate_state
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
