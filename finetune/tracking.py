"""What a run reports: metrics.jsonl, and a progress bar or plain log lines on the main process."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

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
        self.use_bar = self.enabled and (progress_bar == "on" or (progress_bar == "auto" and sys.stderr.isatty()))
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
    """Examples per second since the last `pop`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.examples = 0

    def add(self, examples: int) -> None:
        self.examples += examples

    def pop(self) -> float:
        now = time.perf_counter()
        rate = self.examples / max(now - self.start, 1e-9)
        self.start, self.examples = now, 0
        return rate
