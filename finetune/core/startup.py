"""Time to first step: the seconds from process start to the end of the first optimizer step, by part.

One clock per process (`startup`), started when the process was (imports included). The run marks the end of
each part as it goes — `finetune.training.run` the imports and the setup, the recipe its model and its data, the
run's log the first optimizer step — and `eval_results.json` reports them as `startup_s`."""

from __future__ import annotations

import time


def process_start_time() -> float:
    """When this process started (seconds since the epoch), from the OS."""
    import psutil

    return psutil.Process().create_time()


class StartupClock:
    def __init__(self, start: float | None = None) -> None:
        self.start = process_start_time() if start is None else start
        self.last = self.start
        self.parts: dict[str, float] = {}
        self.done = False

    def mark(self, part: str) -> None:
        """`part` ended now (it began where the last one ended); nothing after the first step is counted."""
        if self.done:
            return
        now = time.time()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now
        self.done = part == "first_step"

    def record(self) -> dict[str, float]:
        """{"total": seconds to the last mark, part: seconds, ...}, rounded to milliseconds."""
        return {"total": round(self.last - self.start, 3), **{k: round(v, 3) for k, v in self.parts.items()}}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.parts.items())
        return f"first optimizer step {self.last - self.start:.1f} s after launch ({parts})"


startup = StartupClock()
