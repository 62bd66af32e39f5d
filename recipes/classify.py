"""Fine-tune a pretrained transformers model for text classification.

    accelerate launch recipes/classify.py                                  # recipes/configs/classify/default.yaml
    accelerate launch recipes/classify.py --config my.yaml train.lr=3e-5   # YAML, then dotted overrides
    accelerate launch recipes/classify.py --help                           # every key, its type, default and doc

How it runs (CPU, GPUs, DeepSpeed, FSDP, several machines) is the launcher's business: see accelerate_configs/.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import transformers
from accelerate.utils import set_seed

from finetune.classify.collate import padding_collator
from finetune.classify.data import describe_data, load_classification_data, tokenize
from finetune.classify.evaluate import evaluate_classifier
from finetune.classify.model import classification_loss, load_classifier
from finetune.core.compile import batch_collators
from finetune.core.config import DRY_RUN
from finetune.core.data import longest_batch, make_dataloader
from finetune.core.errors import exit_on_user_error
from finetune.core.fsdp import prepare_fsdp
from finetune.core.geometry import find_micro_batch_size
from finetune.core.memory import rehearse_step
from finetune.core.metric_names import check_metric_names
from finetune.core.modeling import (
    apply_lora,
    check_lora_targets,
    check_max_length,
    load_model_config,
    load_tokenizer,
    parameter_counts,
    write_model,
)
from finetune.core.optim import build_optimizer, build_scheduler, total_optimizer_steps
from finetune.core.precision import WEIGHT_DTYPES, LostUpdateCheck, check_precision, check_trainable_dtypes
from finetune.core.schemas import ClassifyConfig
from finetune.core.startup import startup
from finetune.plan.dry_run import report_dry_run
from finetune.report.reporting import RunSummary, finish_run
from finetune.training.accumulation import count_label_terms
from finetune.training.checkpoints.resume import resume
from finetune.training.checkpoints.writer import CheckpointWriter
from finetune.training.launch import make_accelerator
from finetune.training.loop import EarlyStopping, checkpoint_due, every, stop_for_signal
from finetune.training.progress import Progress
from finetune.training.run import open_run, start_run
from finetune.training.step import StopSignals, TrainStep, training_windows
from finetune.training.tracking import memory_mb, resolve_trackers

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "classify" / "default.yaml"


def setup(argv: list[str]):
    """Parse and check everything cheap — config, output dir, checkpoint to resume, data, model limits —
    before any weights load."""
    cfg, output_dir, resume_dir = open_run(ClassifyConfig, argv, DEFAULT_CONFIG, "recipes/classify.py")
    data = load_classification_data(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    model_config = load_model_config(cfg.model, num_labels=data.num_outputs)
    check_max_length(cfg.data.max_length, model_config, tokenizer)
    check_lora_targets(cfg.lora, model_config)
    check_metric_names(cfg.resolved_metrics(), regression=cfg.data.task == "regression")
    accelerator, geometry = make_accelerator(cfg.train, resolve_trackers(cfg.logging.trackers), output_dir)
    check_precision(cfg.train.weights_dtype, accelerator)
    return cfg, output_dir, resume_dir, data, tokenizer, accelerator, geometry


@exit_on_user_error
def main(argv: list[str]) -> None:
    cfg, output_dir, resume_dir, data, tokenizer, accelerator, geometry = setup(argv)
    if DRY_RUN in argv:
        return dry_run(cfg, data, tokenizer, accelerator, geometry)
    log = start_run(accelerator, cfg, output_dir, resume_dir, "recipes/classify.py")
    set_seed(cfg.train.seed)

    # ---- model
    model = load_classifier(cfg.model, data.label_names, tokenizer, data.task, WEIGHT_DTYPES[cfg.train.weights_dtype])
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    check_trainable_dtypes(model, cfg.train.weights_dtype)
    trainable, total = parameter_counts(model)
    log.info(f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)")
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.optimizer)
    prepare_fsdp(accelerator, model)  # a no-op unless launched with FSDP2: see finetune/fsdp.py
    model, optimizer = accelerator.prepare(model, optimizer)
    startup.mark("model")

    # ---- data
    with accelerator.main_process_first():
        train_set = tokenize(data.train, tokenizer, cfg.data.max_length)
        val_set = tokenize(data.validation, tokenizer, cfg.data.max_length)
    collate = padding_collator(tokenizer)
    if geometry is None:  # micro_batch_size: auto
        eval_batch = longest_batch(val_set, collate, cfg.eval.batch_size, accelerator.device)
        geometry = find_micro_batch_size(
            accelerator,
            cfg.train.global_batch_size,
            lambda size, steps: rehearse_step(
                accelerator.unwrap_model(model),  # no all-reduce: each process rehearses on its own
                optimizer,
                classification_loss,
                longest_batch(train_set, collate, size, accelerator.device),
                steps,
                eval_batch,
            ),
        )
        accelerator.gradient_accumulation_steps = geometry.accumulation_steps
    train_collate, val_collate = batch_collators(  # train.compile: a few static shapes, see finetune/compile.py
        lambda buckets: padding_collator(tokenizer, buckets=buckets),
        cfg.train.compile, cfg.data.max_length, geometry.micro_batch_size, cfg.eval.batch_size,
    )  # fmt: skip
    train_loader = make_dataloader(
        train_set,
        geometry.micro_batch_size,
        train_collate,
        shuffle=True,
        num_workers=cfg.train.num_workers,
        group_by_length=cfg.data.group_by_length,
        seed=cfg.train.seed,
        global_batch_size=geometry.global_batch_size,
    )
    val_loader = make_dataloader(val_set, cfg.eval.batch_size, val_collate, longest_first=True)
    train_loader, val_loader = accelerator.prepare(train_loader, val_loader)

    total_steps = total_optimizer_steps(
        len(train_loader), geometry.accumulation_steps, cfg.train.epochs, cfg.train.max_steps
    )
    scheduler = accelerator.prepare(
        build_scheduler(optimizer, cfg.train.lr_scheduler, total_steps, cfg.train.warmup_steps)
    )
    log.info(
        f"{len(data.train)} train / {len(data.validation)} validation examples, {data.num_outputs} outputs; "
        f"{geometry.describe()}; {total_steps} optimizer steps; mixed precision {accelerator.mixed_precision}"
    )

    # ---- resume: weights, optimizer, scheduler, RNG; where in the data to continue
    progress = Progress(
        num_processes=accelerator.num_processes,
        micro_batch_size=geometry.micro_batch_size,
        accumulation_steps=geometry.accumulation_steps,
        batches_per_epoch=len(train_loader),
    )
    if resume_dir is not None:
        progress = resume(accelerator, scheduler, resume_dir, progress, allow_changes=cfg.train.resume_allow_changes)
        log.info(f"resumed from {resume_dir}: step {progress.step}, {progress.epochs} epochs")

    def evaluate() -> dict:
        metrics = evaluate_classifier(
            accelerator, model, val_loader, cfg.resolved_metrics(), cfg.train.on_nonfinite_loss
        )
        log.log(progress.step, prefixed("eval", metrics))
        return metrics

    checkpoints = CheckpointWriter(accelerator, cfg.checkpoint.background_write)

    def save(metrics: dict | None, reason: str) -> Path:
        return checkpoints.save(
            scheduler,
            output_dir,
            replace(progress, metrics=metrics, reason=reason),
            cfg,
            lambda target: write_model(accelerator, model, tokenizer, target, cfg.data.max_length, merge_lora=False),
            cfg.checkpoint.keep_last,
            cfg.metric_for_best(),
            wait=reason == "preempted",  # the run exits next
        )

    # ---- train: one optimizer step per accumulation window (finetune.training holds the guarantees)
    startup.mark("data")  # tokenization, batches, schedule, resume
    memory_before = memory_mb(accelerator.device)["now"]
    lost_updates = LostUpdateCheck(model, cfg.train.lr) if cfg.train.weights_dtype == "bf16" else None
    early_stopping = EarlyStopping(
        cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta, cfg.metric_for_best()
    )
    warnings: list[str] = []
    log.start_progress(total_steps, done=progress.step)
    model.train()
    with StopSignals() as signals:
        train_step = TrainStep(
            accelerator, model, optimizer, scheduler, classification_loss, signals,
            cfg.train.max_grad_norm, cfg.train.on_nonfinite_loss, lost_updates, log.info,
        )  # fmt: skip
        for window in training_windows(
            accelerator, train_loader, progress, total_steps, count_label_terms, cfg.train.seed
        ):
            report = train_step(window, progress)
            warnings += report.warnings
            log.advance()
            if every(cfg.logging.every_n_steps, progress.step) or progress.step == total_steps:
                log.log(progress.step, {"epoch": progress.epochs, **train_step.log_record()})
            if progress.step == total_steps:
                break  # the final evaluation and final/ end the run
            checkpoint_now = checkpoint_due(cfg.checkpoint, progress)
            with train_step.paused("evaluation"):  # not training time: eval_results.json reports it apart
                metrics = evaluate() if checkpoint_now or every(cfg.eval.every_n_steps, progress.step) else None
            verdict = early_stopping.update(progress, metrics)
            if checkpoint_now or report.stop or verdict.new_best:
                with train_step.paused("checkpoints"):
                    saved_to = save(metrics, "preempted" if report.stop else "periodic")
            if report.stop:
                log.close()
                stop_for_signal(accelerator, signals, progress, saved_to, argv, log.info)
            if verdict.stop:
                log.info(verdict.reason)
                break

    # ---- evaluate; with early stopping, final/ gets the best evaluated model
    run_stats = {
        **train_step.throughput.summary(),
        "memory_mb": {**memory_mb(accelerator.device), "before_training": memory_before},
    }
    if not early_stopping.stopped:
        early_stopping.update(progress, metrics := evaluate())
    checkpoints.wait()  # the last checkpoint is on disk before any is read back or the run is reported
    metrics, final_step = early_stopping.restore_best(accelerator, scheduler, output_dir, progress, metrics)
    log.close()
    summary = RunSummary(
        "classify", metrics, cfg.resolved_metrics(), len(data.train), len(data.validation),
        geometry.global_batch_size, progress.step, progress.epochs,
        extra={"step": final_step, "epoch": progress.epochs, **run_stats}, warnings=warnings,
        label_names=data.label_names, early_stopping=early_stopping.record(progress),
    )  # fmt: skip
    finish_run(accelerator, model, tokenizer, cfg, output_dir, summary, cfg.data.max_length)


def dry_run(cfg: ClassifyConfig, data, tokenizer, accelerator, geometry) -> None:
    """--dry-run: what the run would train on, for how many steps, and in how much memory; no weights read."""
    if accelerator.is_main_process:
        lines, longest = describe_data(data, tokenizer, cfg.data.max_length)
        model_config = load_model_config(cfg.model, num_labels=data.num_outputs)
        auto_class = transformers.AutoModelForSequenceClassification
        report_dry_run(accelerator, cfg, geometry, lines, len(data.train), longest, model_config, auto_class)


def prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
