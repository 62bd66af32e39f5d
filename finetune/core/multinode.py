"""Several machines: one output dir that every machine sees, and one run that every machine agrees on.

A run on several machines needs `output.dir` on a filesystem shared by all of them (NFS, Lustre, a cloud
filestore), at the same path. `accelerator.save_state` writes the model, optimizer and scheduler from the
main process (machine 0) but each process's RNG state (`random_states_<rank>.pkl`) from that process, on
its own machine; `progress.json`, `model/`, `final/` and `metrics.jsonl` come from the main process only.
On machine-local disks every checkpoint then lacks the other machines' RNG files, so `train.resume_from=latest`
passes over all of them (a warning each) and the run silently starts again from step 0.

`check_machines_agree` finds that at the start, before any work: the main process writes a file with a
fresh random name into the output dir and every process looks for it. It also compares facts each process
worked out on its own (the resolved config, the checkpoint `latest` resolved to), which differ when the
machines were launched with different configs or see different files.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from finetune.core.config import flatten
from finetune.core.errors import UserError

PROBE_PREFIX = ".shared-fs-check-"


def check_machines_agree(accelerator: Accelerator, output_dir: Path, timeout_s: float = 60.0, **facts: Any) -> None:
    """Raise UserError on every process unless every process sees the same `output_dir` and the same `facts`.

    Call it on every process, after the Accelerator exists and before anything is written. A process that
    does not see the probe file at once looks again for up to `timeout_s` (a network filesystem may cache a
    directory's listing for a while); a run that passes pays two small collectives and one tiny file.
    With one process it does nothing.
    """
    if accelerator.num_processes == 1:
        return
    probe = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        probe.write_text(probe.name)
    mine = {"host": socket.gethostname(), "probe": probe.name if probe else None, "facts": _comparable(facts)}
    everyone = gather_object([mine])  # the main process wrote the probe before entering this collective
    name = everyone[0]["probe"]
    seen = gather_object([_sees(output_dir / name, timeout_s)])
    if probe is not None:
        probe.unlink(missing_ok=True)

    def who(rank: int) -> str:
        return f"process {rank} (host {everyone[rank]['host']})"

    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise UserError(
            f"output.dir={output_dir} is not the same directory on every machine: {', '.join(map(who, blind))} "
            f"cannot see the file {who(0)} wrote into it. Checkpoints, resuming and final/ need one filesystem "
            "shared by all machines (NFS, Lustre, a cloud filestore): set output.dir to a path on it, the same "
            "path on every machine."
        )
    problems = []
    for key, reference in everyone[0]["facts"].items():
        for rank, entry in enumerate(everyone):
            value = entry["facts"].get(key)
            if value != reference:
                problems.append(f"{key}: {_difference(reference, value)} ({who(0)} vs {who(rank)})")
                break
    if problems:
        raise UserError(
            "the machines disagree about the run:\n  - "
            + "\n  - ".join(problems)
            + "\nLaunch every machine with the same code, config and command-line overrides, on the same data "
            "and a shared output.dir."
        )


def _sees(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if path.read_text() == path.name:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _comparable(facts: dict[str, Any]) -> dict[str, Any]:
    """Facts as JSON-shaped values (paths and other objects as strings), comparable across processes."""
    return {key: json.loads(json.dumps(value, sort_keys=True, default=str)) for key, value in facts.items()}


def _difference(reference: Any, value: Any) -> str:
    if isinstance(reference, dict) and isinstance(value, dict):
        a, b = dict(flatten(reference)), dict(flatten(value))
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
    return f"{reference!r} vs {value!r}"
