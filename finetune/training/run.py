"""The start of every run, the same in every recipe: the config, the output dir, the checkpoint to resume,
and the run's log. The recipe-specific checks (data, model limits) come between `open_run` and `start_run`."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import transformers
from accelerate import Accelerator

from finetune.core.config import config_to_dict, load_config, save_config
from finetune.core.multinode import check_machines_agree
from finetune.core.run_dir import check_output_dir, clear_previous_run, is_finished
from finetune.core.startup import startup
from finetune.training.checkpoints.layout import read_progress
from finetune.training.checkpoints.resume import config_changes, refuse_changes, resolve_resume, trim_metrics_log
from finetune.training.tracking import RunLog


def open_run(schema: type, argv: list[str], default_config: Path, script: str):
    """The config from argv; the output dir, checked; the checkpoint to resume (None: a fresh run).

    A requeued job whose run already finished exits 0 here; everything else that is wrong is a UserError
    before any data or weights load."""
    startup.mark("imports")
    cfg = load_config(schema, argv, default_config, prog=script)
    datasets.disable_progress_bars()  # small in-memory steps; the recipe reports what matters
    transformers.logging.disable_progress_bar()  # bars per weight load/save would drown the log
    output_dir = Path(cfg.output.dir)
    if cfg.train.resume_from == "latest" and is_finished(output_dir):  # e.g. a job requeued after it ended
        print(f"{output_dir} holds a finished run: nothing to resume. Set output.overwrite=true to train again.")
        sys.exit(0)
    resume_dir = resolve_resume(cfg.train.resume_from, output_dir)
    check_output_dir(
        output_dir,
        cfg.output.overwrite,
        resuming=resume_dir is not None,
        fresh_if_unfinished=cfg.train.resume_from == "latest",
    )
    if resume_dir is not None and not cfg.train.resume_allow_changes:
        refuse_changes(config_changes(resume_dir, config_to_dict(cfg)), resume_dir)
    return cfg, output_dir, resume_dir


def start_run(accelerator: Accelerator, cfg, output_dir: Path, resume_dir: Path | None, script: str) -> RunLog:
    """Make the output dir ready (a fresh run clears what `check_output_dir` allowed; a resumed one trims its
    metrics log to the checkpoint) with the resolved config in it, and open the run's log and trackers."""
    startup.mark("setup")  # config, data read, tokenizer, checks, Accelerator
    # Several machines must share output.dir (checkpoints hold every process's RNG file) and the config.
    check_machines_agree(accelerator, output_dir, config=config_to_dict(cfg), resume_from=resume_dir)
    first_step = read_progress(resume_dir).step if resume_dir is not None else 0
    if accelerator.is_main_process:
        if resume_dir is not None:
            trim_metrics_log(output_dir / "metrics.jsonl", first_step)
        else:
            clear_previous_run(output_dir)  # only what check_output_dir allowed: overwrite, or a run with no checkpoint
        output_dir.mkdir(parents=True, exist_ok=True)
        rerun = f"accelerate launch {script} --config <this file> output.dir=<new dir>"
        save_config(cfg, output_dir / "config.yaml", header=f"Resolved config; rerun with:\n  {rerun}")
    accelerator.wait_for_everyone()
    logging = cfg.logging
    return RunLog(accelerator, output_dir, logging.progress_bar, logging.project, config_to_dict(cfg), first_step)
