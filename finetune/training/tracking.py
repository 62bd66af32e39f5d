"""What a run reports: metrics.jsonl (the source of truth), the same records to experiment trackers through
Accelerate (TensorBoard, W&B, MLflow, ...), and a progress bar or plain log lines on the main process."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from finetune.core.errors import UserError
from finetune.core.run_dir import RunDir
from finetune.core.startup import startup

# logging.trackers names (Accelerate's) -> what to install for each.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard (pip install -e '.[track]')",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def resolve_trackers(trackers: list[str] | None) -> list[str]:
    """The trackers for `Accelerator(log_with=...)`: logging.trackers, or TensorBoard when it is installed.

    Accelerate drops a tracker whose package is missing with a log line only; here it is a config error."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    if trackers is None:
        return ["tensorboard"] if "tensorboard" in available else []
    unknown = [name for name in trackers if name not in TRACKER_PACKAGES]
    if unknown:
        raise UserError(
            f"logging.trackers: unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKER_PACKAGES)}."
        )
    missing = [name for name in trackers if name not in available]
    if missing:
        installs = "; ".join(f"{name}: install {TRACKER_PACKAGES[name]}" for name in missing)
        raise UserError(
            f"logging.trackers lists {', '.join(missing)}, not installed here ({installs}). "
            "Install it, or remove it from logging.trackers."
        )
    return list(dict.fromkeys(trackers))


def hyperparameters(config: dict) -> dict[str, int | float | str | bool]:
    """The config flattened to dotted keys with scalar values, as trackers' hyperparameter tables take them."""
    from finetune.core.config import flatten

    return {key: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for key, v in flatten(config)}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLog:
    """Append metrics to `<output_dir>/metrics.jsonl`, send them to the Accelerator's trackers, and show them;
    a no-op off the main process.

    With trackers (`Accelerator(log_with=...)`), `config` is logged as their hyperparameters. A resumed run
    (`first_step` > 0) continues the trackers' curves: TensorBoard drops what the interrupted run logged after
    `first_step`, as metrics.jsonl was trimmed to it."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        progress_bar: str = "auto",
        project: str = "finetune",
        config: dict | None = None,
        first_step: int = 0,
    ):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = RunDir(output_dir).metrics
        self.use_bar = self.enabled and (progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()))
        self.bar = None
        if accelerator.log_with:
            accelerator.init_trackers(
                project,
                config=hyperparameters(config or {}),
                init_kwargs={
                    "tensorboard": {"purge_step": first_step + 1} if first_step else {},
                    "wandb": {"name": output_dir.name},
                },
            )

    def start_progress(self, total_steps: int, done: int = 0) -> None:
        """Show a progress bar over `total_steps` optimizer steps, `done` of them already (a resumed run)."""
        if self.use_bar:
            self.bar = tqdm(total=total_steps, initial=done, desc="train", unit="step")

    def info(self, message: str) -> None:
        """A line for the user (main process)."""
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log(self, step: int, metrics: dict) -> None:
        """Record `metrics` at optimizer step `step`."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, step=step)
        self.info(" ".join(f"{k}={_format(v)}" for k, v in record.items()))

    def advance(self) -> None:
        """An optimizer step was taken; the first one of this launch ends the startup."""
        if self.bar:
            self.bar.update(1)
        if not startup.done:
            startup.mark("first_step")
            self.info(startup.describe())

    def close(self) -> None:
        """Close the bar and finish the trackers (their files complete even if the process exits next)."""
        if self.bar:
            self.bar.close()
        if self.enabled:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.trackers.clear()  # end_training() must not finish them twice


class Throughput:
    """Training examples and tokens per second, per logging interval and over the whole run, without the
    time spent in `paused()` blocks (evaluation, checkpoints). Token counts may be device tensors: they are
    read back only when a rate is asked for."""

    def __init__(self) -> None:
        self.start = self.interval_start = time.perf_counter()
        self.started_at = time.time()  # when training began, for the overhead report
        self.examples = self.interval_examples = 0
        self.tokens = self.interval_tokens = 0
        self.paused_s = self.interval_paused_s = 0.0
        self.paused_by: dict[str, float] = {}  # seconds per kind of pause (evaluation, checkpoints)

    def add(self, examples: int, tokens: int | torch.Tensor = 0) -> None:
        self.examples += examples
        self.interval_examples += examples
        self.interval_tokens = self.interval_tokens + tokens

    @contextmanager
    def paused(self, kind: str = "other"):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.paused_s += seconds
            self.interval_paused_s += seconds
            self.paused_by[kind] = self.paused_by.get(kind, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        """Examples and tokens per second since the last pop."""
        now = time.perf_counter()
        seconds = max(now - self.interval_start - self.interval_paused_s, 1e-9)
        tokens = int(self.interval_tokens)
        self.tokens += tokens
        rates = {"samples_per_s": self.interval_examples / seconds, "tokens_per_s": tokens / seconds}
        self.interval_start, self.interval_examples, self.interval_tokens, self.interval_paused_s = now, 0, 0, 0.0
        return rates

    def summary(self) -> dict[str, float]:
        """Whole-run training time (seconds, evaluation excluded), examples and tokens per second."""
        seconds = time.perf_counter() - self.start - self.paused_s
        self.tokens += int(self.interval_tokens)
        self.interval_tokens = 0
        return {
            "train_runtime_s": round(seconds, 3),
            "train_samples_per_s": self.examples / max(seconds, 1e-9),
            "train_tokens_per_s": self.tokens / max(seconds, 1e-9),
            "training_started_at": self.started_at,
            "paused_s": dict(self.paused_by),
        }


def memory_mb(device: torch.device) -> dict[str, float | str]:
    """Memory of this process: CUDA memory allocated by tensors on a GPU, resident set size on CPU.

    `peak` is the high-water mark since the process (or the CUDA peak counter) started.
    """
    if device.type == "cuda":
        return {
            "kind": "cuda_allocated",
            "now": torch.cuda.memory_allocated(device) / 2**20,
            "peak": torch.cuda.max_memory_allocated(device) / 2**20,
        }
    import resource

    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"kind": "cpu_rss", "now": psutil.Process().memory_info().rss / 2**20, "peak": peak_kb / 1024}
