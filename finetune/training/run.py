"""One run's state, and the start of every run, the same in every recipe.

A recipe reads:

    run = open_run(ClassifyConfig, argv, DEFAULT_CONFIG, "recipes/classify.py")  # config, output dir, resume point
    ...the recipe's cheap checks: data, tokenizer, model limits...
    launch(run, model_config, auto_class)                   # Accelerator, batch geometry, checks of the levers
    start_run(run)                                                                 # output dir ready, the run's log

`Run` is what the loop (`finetune.training.loop.fit`), the batches (`finetune.training.batches`), the checkpoint
writer and the reporting take, instead of positional lists.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import transformers
from accelerate import Accelerator

from finetune.core.config import DRY_RUN, config_to_dict, load_config, save_config
from finetune.core.geometry import BatchGeometry
from finetune.core.multinode import check_machines_agree
from finetune.core.precision import check_precision
from finetune.core.run_dir import RunDir, check_output_dir, clear_previous_run, is_finished
from finetune.core.startup import startup
from finetune.training.checkpoints.layout import read_progress
from finetune.training.checkpoints.resume import config_changes, refuse_changes, resolve_resume, trim_metrics_log
from finetune.training.launch import make_accelerator
from finetune.training.levers import check_levers, weights_loading
from finetune.training.tracking import RunLog, resolve_trackers


@dataclass
class Run:
    """A run: its config, where it writes, where it resumes from, how it was launched, and its log."""

    cfg: Any  # the recipe's resolved config (a ClassifyConfig, SFTConfig, ...)
    script: str  # the recipe as launched: recipes/classify.py
    argv: list[str]  # the recipe's arguments, for the resume command a stopped run prints
    dir: RunDir
    resume_from: Path | None  # the checkpoint to resume; None: a fresh run
    accelerator: Accelerator | None = None  # from `launch`
    # Decided by `launch` from the config, or with micro_batch_size: auto by `finetune.training.batches` once the
    # model is in memory; `finetune.training.launch.settle_geometry` alone applies it.
    geometry: BatchGeometry | None = None
    log: RunLog | None = None  # from `start_run`

    @property
    def recipe(self) -> str:
        """classify, sft, ...: the recipe's name."""
        return Path(self.script).stem

    @property
    def dry_run(self) -> bool:
        return DRY_RUN in self.argv

    def weights_loading(self) -> dict:
        """How the trained model's weights load (`levers.weights_loading`): pass to the recipe's model loader."""
        return weights_loading(self.cfg, self.accelerator)


def open_run(schema: type, argv: list[str], default_config: Path, script: str) -> Run:
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
    return Run(cfg=cfg, script=script, argv=list(argv), dir=RunDir(output_dir), resume_from=resume_dir)


def launch(run: Run, model_config, auto_class) -> Run:
    """The Accelerator as launched, the batch geometry the config asks for (None with `auto`), and the checks that
    need to know the device and the model's config: the precision, the memory levers (`levers.check_levers`)."""
    cfg = run.cfg
    run.accelerator, run.geometry = make_accelerator(cfg.train, resolve_trackers(cfg.logging.trackers), run.dir.root)
    check_precision(cfg.train.weights_dtype, run.accelerator)
    check_levers(cfg, run.accelerator, model_config, auto_class)
    return run


def start_run(run: Run) -> RunLog:
    """Make the output dir ready (a fresh run clears what `check_output_dir` allowed; a resumed one trims its
    metrics log to the checkpoint) with the resolved config in it, and open the run's log and trackers."""
    startup.mark("setup")  # config, data read, tokenizer, checks, Accelerator
    accelerator, cfg, output_dir, resume_dir = run.accelerator, run.cfg, run.dir.root, run.resume_from
    # Several machines must share output.dir (checkpoints hold every process's RNG file) and the config.
    check_machines_agree(accelerator, output_dir, config=config_to_dict(cfg), resume_from=resume_dir)
    first_step = read_progress(resume_dir).step if resume_dir is not None else 0
    if accelerator.is_main_process:
        if resume_dir is not None:
            trim_metrics_log(run.dir.metrics, first_step)
        else:
            clear_previous_run(output_dir)  # only what check_output_dir allowed: overwrite, or a run with no checkpoint
        output_dir.mkdir(parents=True, exist_ok=True)
        rerun = f"accelerate launch {run.script} --config <this file> output.dir=<new dir>"
        save_config(cfg, run.dir.config, header=f"Resolved config; rerun with:\n  {rerun}")
    accelerator.wait_for_everyone()
    logging = cfg.logging
    run.log = RunLog(accelerator, output_dir, logging.progress_bar, logging.project, config_to_dict(cfg), first_step)
    return run.log
