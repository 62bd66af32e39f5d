"""What a run reports: metrics.jsonl, and a progress bar or plain log lines on the main process."""

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


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLog:
    """Append metrics to `<output_dir>/metrics.jsonl` and show them; a no-op off the main process."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, progress_bar: str = "auto"):
        self.enabled = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        self.use_bar = self.enabled and (progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()))
        self.bar = None

    def start_progress(self, total_steps: int) -> None:
        """Show a progress bar over `total_steps` optimizer steps (main process, when enabled)."""
        if self.use_bar:
            self.bar = tqdm(total=total_steps, desc="train", unit="step")

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
        self.info(" ".join(f"{k}={_format(v)}" for k, v in record.items()))

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class Throughput:
    """Training examples and tokens per second, per logging interval and over the whole run, without the
    time spent in `paused()` blocks (evaluation, checkpoints). Token counts may be device tensors: they are
    read back only when a rate is asked for."""

    def __init__(self) -> None:
        self.start = self.interval_start = time.perf_counter()
        self.examples = self.interval_examples = 0
        self.tokens = self.interval_tokens = 0
        self.paused_s = self.interval_paused_s = 0.0

    def add(self, examples: int, tokens: int | torch.Tensor = 0) -> None:
        self.examples += examples
        self.interval_examples += examples
        self.interval_tokens = self.interval_tokens + tokens

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0
            self.interval_paused_s += time.perf_counter() - t0

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
