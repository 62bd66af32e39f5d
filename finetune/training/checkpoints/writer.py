"""Writing checkpoints atomically, in the foreground or from a RAM copy in the background."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SCHEDULER_NAME, broadcast_object_list

from finetune.core.config import save_config
from finetune.core.errors import UserError, first_line
from finetune.core.run_dir import RunDir, replace_dir, write_json
from finetune.training.checkpoints.layout import (
    MODEL_DIR,
    PROGRESS_FILE,
    SCHEDULER_FILE,
    STATE_DIR,
    prune,
)
from finetune.training.progress import Progress

# --------------------------------------------------------------------------------------------
# Saving, pruning, loading
# --------------------------------------------------------------------------------------------


STAGING_PREFIX = "finetune-checkpoint-"


class CheckpointWriter:
    """Writes checkpoints atomically; with `background`, training goes on while they reach the disk.

    Every process calls `save`. In the foreground, the checkpoint is written into `.tmp-step_N/`, completed by
    progress.json and renamed into place before `save` returns. In the background (one process or DDP, with
    room in RAM), the main process serializes the checkpoint into a staging dir in shared memory (/dev/shm:
    the GPU-to-host copy and the pickling, at memory speed) and a thread copies it to the output dir, renames it
    into place and prunes, while training goes on; the other processes' RNG files are written directly. The
    checkpoint is atomic either way: a run killed mid-copy leaves a `.tmp-*` dir, and its previous checkpoint.

    Only one write is in flight: the next `save` waits for the last, and so does `wait` (call it before reading
    checkpoints back, e.g. to restore the best). A failed background write is raised by the next `save` or
    `wait`. A run that ends any other way still finishes the copy: the thread is not a daemon, so Python
    joins it at exit."""

    def __init__(self, accelerator: Accelerator, background: bool) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        # DeepSpeed and FSDP write their shards from every process, through their engines: foreground only.
        self.background = background and not sharded  # the same on every process: `wait` is a collective then
        self.staging_root = _staging_root() if self.background else None
        self.pending: threading.Thread | None = None
        self.error: BaseException | None = None
        self.told_no_room = False
        if self.staging_root is not None and accelerator.is_local_main_process:
            _remove_stale_staging(self.staging_root)

    def save(
        self, scheduler, run_dir: Path, progress: Progress, cfg, write_model, keep_last: int, metric_for_best: str,
        wait: bool = False,
    ) -> Path:  # fmt: skip
        """Write the checkpoint of `progress` (`write_model(dir)` writes model/, on every process: a collective
        under ZeRO-3/FSDP); with `wait`, return only once it is on disk (a run about to exit)."""
        self.wait()
        accelerator = self.accelerator
        target = RunDir(run_dir).checkpoint(progress.step)
        tmp = target.with_name(f".tmp-{target.name}")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)  # before any process writes its RNG state into it
        accelerator.wait_for_everyone()

        def write(into: Path) -> None:
            accelerator.save_state(str(into / STATE_DIR))
            write_model(into / MODEL_DIR)
            if accelerator.is_main_process:
                if not (into / STATE_DIR / f"{SCHEDULER_NAME}.bin").exists():  # see SCHEDULER_FILE
                    write_json(into / SCHEDULER_FILE, scheduler.state_dict())
                save_config(cfg, into / RunDir.CONFIG)

        staging = self._staging_dir() if accelerator.is_main_process else None
        try:
            write(staging or tmp)
        except OSError as err:
            if staging is None:
                raise
            # shared memory filled up after all (another program took it): this one in the foreground. Only the
            # main process writes here, and saving a DDP or single-process state takes no collective.
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
            warnings.warn(
                f"checkpoint {target.name} could not be staged in RAM ({err}): written in the foreground", stacklevel=2
            )
            write(tmp)
        accelerator.wait_for_everyone()  # every process's RNG file is in before the dir is renamed into place

        def finish() -> None:
            if staging is not None:
                shutil.copytree(staging, tmp, dirs_exist_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
            write_json(tmp / PROGRESS_FILE, asdict(progress))  # last: marks the checkpoint complete
            replace_dir(tmp, target)
            prune(run_dir, keep_last, metric_for_best)

        if accelerator.is_main_process:
            if staging is None:
                finish()
            else:
                self.pending = threading.Thread(target=self._run, args=(finish, staging), name=f"write {target.name}")
                self.pending.start()
        if wait:
            self.wait()
        else:
            accelerator.wait_for_everyone()
        return target

    def wait(self) -> None:
        """Return once the checkpoint being written is complete (every process calls this); raise, on every
        process, what a background write raised."""
        if not self.background:
            return
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        error, self.error = self.error, None
        problem = f"{first_line(str(error)) or type(error).__name__}" if error is not None else None
        if self.accelerator.num_processes > 1:  # the main process wrote it: every process must stop alike
            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise UserError(f"a checkpoint could not be written: {problem}")

    def _run(self, finish, staging: Path) -> None:
        try:
            finish()
        except BaseException as err:  # raised in the training thread by the next save or wait
            self.error = err
            shutil.rmtree(staging, ignore_errors=True)

    def _staging_dir(self) -> Path | None:
        """A fresh staging dir in shared memory, or None (foreground) when there is no room for a checkpoint."""
        if self.staging_root is None:
            return None
        import psutil

        needed = int(1.1 * _checkpoint_bytes(self.accelerator)) + 2**28  # plus configs, tokenizer, pickling
        # the staged copy is RAM taken from the run until the thread is done: leave the run 2 GiB to spare
        shm_free, ram_free = shutil.disk_usage(self.staging_root).free, psutil.virtual_memory().available
        if shm_free < needed or ram_free < needed + 2**31:
            if not self.told_no_room:  # once a run: the checkpoints are right, only slower to write
                self.told_no_room = True
                warnings.warn(
                    f"checkpoints are written in the foreground: one needs ~{needed / 2**30:.1f} GiB in "
                    f"{self.staging_root} ({shm_free / 2**30:.1f} GiB free) and in RAM beside 2 GiB to spare "
                    f"({ram_free / 2**30:.1f} GiB available). In a container, a larger --shm-size gives room.",
                    stacklevel=3,
                )
            return None
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.staging_root))


def _staging_root() -> Path | None:
    root = Path("/dev/shm")
    return root if root.is_dir() and os.access(root, os.W_OK) else None


def _remove_stale_staging(root: Path) -> None:
    """Staging dirs of runs killed mid-write (their process is gone) would hold RAM until a reboot."""
    import psutil

    for path in root.glob(f"{STAGING_PREFIX}*"):
        pid = path.name.removeprefix(STAGING_PREFIX).split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _checkpoint_bytes(accelerator: Accelerator) -> int:
    """About what a checkpoint writes: every model's weights (in model/) and every optimizer's state."""
    total = 0
    for model in accelerator._models:
        total += sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for optimizer in accelerator._optimizers:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total
