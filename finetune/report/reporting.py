"""What a finished run leaves behind: final/ with its model card, eval_results.json, curves.png, and the
closing lines on the console (warnings first: a run that did not learn must not read like a success)."""

from __future__ import annotations

import shlex
import sys
import time
import warnings as py_warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.core import quantization
from finetune.core.config import config_to_dict
from finetune.core.modeling import save_final
from finetune.core.run_dir import write_json
from finetune.core.startup import process_start_time, startup
from finetune.report.model_card import CardFacts, describe_hardware, write_model_card
from finetune.training.loop import Outcome
from finetune.training.run import Run


def wall_time_s() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - process_start_time()


@dataclass
class RunSummary:
    """The facts of a finished run that the recipe gathered; `finish_run` writes them everywhere."""

    recipe: str  # classify | sft
    metrics: dict  # the final evaluation of the model saved to final/ (names without eval_)
    scores: list[str]  # metric names printed on the done line
    train_examples: int
    validation_examples: int
    effective_batch: int
    optimizer_steps: int
    epochs: float
    extra: dict = field(default_factory=dict)  # run statistics and anything else for eval_results.json
    warnings: list[str] = field(default_factory=list)
    label_names: list[str] | None = None
    early_stopping: dict | None = None


def overhead_report(wall: float, train_s: float | None, training_started_at: float | None, paused: dict) -> dict:
    """Where the wall time that was not training went: `share` = (wall - training) / wall, and seconds before
    training (startup: imports, data, model), in evaluations and checkpoints during training, and after it (the
    final evaluation, up to the final save)."""
    if train_s is None or training_started_at is None:
        return {}
    before = training_started_at - process_start_time()
    during = sum(paused.values())
    return {
        "share": round((wall - train_s) / wall, 4),
        "before_training_s": round(before, 2),
        **{f"{kind}_s": round(seconds, 2) for kind, seconds in paused.items()},
        "after_training_s": round(wall - before - train_s - during, 2),
    }


def precision_text(accelerator: Accelerator, weights_dtype: str) -> str:
    mixed = accelerator.mixed_precision
    compute = f"{mixed} mixed precision" if mixed != "no" else "full precision"
    return f"{compute}, {weights_dtype} weights"


def reproduce_command(recipe: str, output_dir: Path, accelerator: Accelerator) -> str:
    """The command that trains this run again, from the resolved config it saved, into a new dir."""
    launcher = ["accelerate", "launch"]
    if accelerator.num_processes > 1:  # DeepSpeed / FSDP / several machines: add the same --config_file
        launcher += ["--num_processes", str(accelerator.num_processes)]
    if accelerator.mixed_precision != "no":
        launcher += ["--mixed_precision", accelerator.mixed_precision]
    config = output_dir / "config.yaml"
    return shlex.join([*launcher, f"recipes/{recipe}.py", "--config", str(config), f"output.dir={output_dir}-again"])


def finish_run(
    run: Run,
    model,
    tokenizer,
    outcome: Outcome,
    scores: list[str],
    sizes: tuple[int, int],
    label_names: list[str] | None = None,
    data_stats: dict | None = None,
    validation=None,
) -> None:
    """The end of every recipe's run: final/, eval_results.json, curves.png and the closing lines, from what `fit`
    left (`outcome`) and the recipe's data: `sizes` = (training, validation) examples or rows; `scores` are the
    metrics the done line prints; `validation` (batches) checks a quantized model's merge (`merge_check`)."""
    progress = outcome.progress
    train_examples, validation_examples = sizes
    summary = RunSummary(
        recipe=run.recipe,
        metrics=outcome.metrics,
        scores=scores,
        train_examples=train_examples,
        validation_examples=validation_examples,
        effective_batch=run.geometry.global_batch_size,
        optimizer_steps=progress.step,
        epochs=progress.epochs,
        extra={"step": outcome.step, "epoch": progress.epochs, **outcome.stats, **(data_stats or {})},
        warnings=outcome.warnings,
        label_names=label_names,
        early_stopping=outcome.early_stopping,
    )
    if validation is not None and quantization.is_quantized(run.accelerator.unwrap_model(model)):
        summary.extra["merged_model"] = merge_check(run.accelerator, model, validation)
    write_outputs(run.accelerator, model, tokenizer, run.cfg, run.dir.root, summary, run.cfg.data.max_length)


def merge_check(accelerator: Accelerator, model, validation) -> dict:
    """How far final/'s merged model is from the quantized model with its adapter (`quantization.merge_gap`), over
    the first validation batches of every process, the largest difference of all of them."""
    gap = quantization.merge_gap(accelerator.unwrap_model(model), validation, accelerator.device, accelerator.autocast)
    if "not_measured" in gap or accelerator.num_processes == 1:
        return gap
    worst = accelerator.gather(torch.tensor([gap["max_logit_difference"]], device=accelerator.device))
    return {**gap, "max_logit_difference": float(worst.max())}


def write_outputs(
    accelerator: Accelerator, model, tokenizer, cfg, output_dir: Path, summary: RunSummary, max_length: int
) -> None:
    """Save final/ with its model card (every process: a collective under ZeRO-3/FSDP), then on the main
    process write eval_results.json and curves.png and print the warnings and the done line; end training."""
    metrics = dict(summary.metrics)
    found = [metrics.pop("warning")] if "warning" in metrics else []
    warnings = [*summary.warnings, *found]
    wall = wall_time_s()
    extra = dict(summary.extra)
    overhead = overhead_report(
        wall, extra.get("train_runtime_s"), extra.pop("training_started_at", None), extra.pop("paused_s", {})
    )
    results = {
        **extra,
        "wall_time_s": round(wall, 1),
        "overhead": overhead,
        "startup_s": startup.record(),
        **metrics,
        "metric_for_best": cfg.metric_for_best(),
        **({"early_stopping": summary.early_stopping} if summary.early_stopping else {}),
        "warnings": warnings,
    }
    card = CardFacts(
        recipe=summary.recipe,
        config=config_to_dict(cfg),
        results=results,
        metric_for_best=cfg.metric_for_best(),
        train_examples=summary.train_examples,
        validation_examples=summary.validation_examples,
        effective_batch=summary.effective_batch,
        optimizer_steps=summary.optimizer_steps,
        epochs=summary.epochs,
        precision=precision_text(accelerator, cfg.train.weights_dtype),
        hardware=describe_hardware(accelerator),
        wall_time_s=wall,
        command=reproduce_command(summary.recipe, output_dir, accelerator),
        label_names=summary.label_names,
        stopped_early=summary.early_stopping if (summary.early_stopping or {}).get("stopped_early") else None,
    )
    # The card goes into final/ before it is renamed into place: a final/ without its card is never seen.
    save_final(accelerator, model, tokenizer, output_dir / "final", max_length, lambda tmp: write_model_card(tmp, card))
    if accelerator.is_main_process:
        write_json(output_dir / "eval_results.json", results)
        write_curves(output_dir, cfg.metric_for_best())
        scores = " ".join(f"{name}={metrics[name]:.4f}" for name in summary.scores if name in metrics)
        if warnings:
            print("\n".join(["", "!" * 100, *(f"WARNING: {w}" for w in warnings), "!" * 100]), file=sys.stderr)
        print(f"done{' WITH WARNINGS' if warnings else ''}: {output_dir / 'final'} {scores}")
    accelerator.end_training()


def write_curves(output_dir: Path, metric_for_best: str) -> None:
    """curves.png of the run; a plotting failure is a warning, never a failed run."""
    from finetune.report.plots import plot_run

    try:
        plot_run(output_dir, metric_for_best)
    except Exception as err:  # matplotlib raises many types; the trained model matters more than its plot
        py_warnings.warn(f"could not draw {output_dir / 'curves.png'}: {err}", stacklevel=2)
