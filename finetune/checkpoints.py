"""Checkpoints you can resume from exactly.

A checkpoint is `<run>/checkpoints/step_NNNNNN/`:

    state/          accelerator.save_state: optimizer, scheduler, grad scaler, every process's RNG
    model/          save_pretrained weights (safetensors) + tokenizer: what finetune-eval scores, and what a
                    resumed run loads its weights from. With LoRA, the adapter alone (the trainable weights).
    config.yaml     the resolved config of the run
    progress.json   step, epoch, batches into the epoch, samples seen, batch geometry, eval metrics

It is written into `.tmp-step_NNNNNN/` and renamed into place, progress.json last: a crash mid-save
leaves a `.tmp-*` dir that nothing mistakes for a checkpoint. `CheckpointWriter` can do the disk write in a
background thread, from a copy staged in shared memory, while training goes on. After each save the newest
`checkpoint.keep_last` checkpoints are kept plus the best by `eval.metric_for_best` (`checkpoints/best`
links to it).

The weights are written once. `keep_weights_once` registers Accelerate save/load hooks: `save_state` leaves
the model out of state/ and `load_state` reads it from model/ instead (bitwise the same tensors). A LoRA
checkpoint holds only the trainable weights and their optimizer state: the frozen base is the model the run
started from, and state/base_model.json keeps a hash of its frozen weights, compared on resume. Under
DeepSpeed and FSDP the engine's sharded state/ keeps its own copy of the weights (model/ is the gathered one).

Exact resume needs the same data in the same order and the same dropout masks. The shuffle order is
a function of (seed, epoch) alone (Accelerate's seedable sampler, or `LengthGroupedSampler`), so a
resumed run skips the epoch's first batches. Dropout draws from the global torch RNG, which other
code also draws from (creating a DataLoader iterator takes a base seed from it), so the training
loop reseeds it at the start of every accumulation window from (seed, step): the masks then depend
on nothing but the step, with or without an interruption.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shlex
import shutil
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import SCHEDULER_NAME, broadcast_object_list, extract_model_from_parallel, set_seed

from finetune.config import flatten, read_yaml, save_config
from finetune.errors import UserError, first_line
from finetune.metric_names import LOWER_IS_BETTER
from finetune.runs import replace_dir, write_json

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"
MODEL_DIR = "model"
PROGRESS_FILE = "progress.json"
# Accelerate's save_state skips an LR scheduler prepared on its own under DeepSpeed (it wraps it for the
# engine but never hands it over, so neither saves it): its state then goes here, as JSON.
SCHEDULER_FILE = "scheduler.json"
BEST_LINK = "best"
BASE_MODEL_FILE = "base_model.json"  # in state/: the hash of a LoRA run's frozen base weights
_NAME = re.compile(r"^step_(\d+)$")

# Keys whose change makes a resumed run a different run than the one checkpointed.
RUN_DEFINING_KEYS = (
    "model.",
    "data.",
    "lora.",
    "train.epochs",
    "train.max_steps",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
    "train.global_batch_size",
    "train.optimizer",
    "train.lr",
    "train.weight_decay",
    "train.lr_scheduler",
    "train.warmup_steps",
    "train.max_grad_norm",
    "train.mixed_precision",
    "train.weights_dtype",
    "train.seed",
)


@dataclass
class Progress:
    """Where training stands after an optimizer step: enough to continue with the very next batch.

    The one position record of a run: `advance` moves it over a window, rolling into the next epoch
    when the window used up the epoch's micro-batches."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batches_into_epoch: int = 0  # micro-batches of `epoch` already trained on, per process
    samples_seen: int = 0  # loss terms (examples, or target tokens) trained on, over all processes
    num_processes: int = 1
    micro_batch_size: int = 0
    accumulation_steps: int = 1
    batches_per_epoch: int = 0  # micro-batches per epoch per process
    metrics: dict | None = None  # eval metrics at `step`, if evaluated
    reason: str = "periodic"  # periodic | preempted
    # Early stopping (finetune.training.EarlyStopping): kept here so that a resumed run counts on.
    best_value: float | None = None  # the best eval.metric_for_best so far
    best_step: int | None = None
    reference_value: float | None = None  # the last value that improved by more than the minimum delta
    evals_without_improvement: int = 0

    def advance(self, window) -> None:
        """One optimizer step over `window` (a `finetune.accumulation.Window`) was taken."""
        self.step += 1
        self.samples_seen += window.num_loss_terms
        self.batches_into_epoch += window.size
        if self.batches_into_epoch >= self.batches_per_epoch:
            self.epoch, self.batches_into_epoch = self.epoch + 1, 0

    @property
    def epoch_ended(self) -> bool:
        """The last step ended an epoch."""
        return self.step > 0 and self.batches_into_epoch == 0

    @property
    def epochs(self) -> float:
        """Epochs trained, with the fraction of the current one (what eval_results.json reports)."""
        fraction = self.batches_into_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0
        return round(self.epoch + fraction, 4)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def seed_window(seed: int, step: int) -> None:
    """Seed every RNG from (seed, step): the dropout masks of the window after `step` depend on nothing else.

    On CPU and CUDA it sets the very generator states `set_seed` sets (Python, NumPy, torch's CPU generator, every
    CUDA device's) without `torch.manual_seed`'s lazy seeding of devices that are not there (XPU and MTIA, and
    CUDA on a machine without one), which formats the call stack each time: ~6% of a small model's CPU step."""
    value = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    device_rng = _device_rng()
    if device_rng == "other":  # XPU, MPS, NPU, XLA, ...: Accelerate knows how to seed them
        set_seed(value)
        return
    random.seed(value)
    np.random.seed(value)
    torch.default_generator.manual_seed(value)
    if device_rng == "cuda":
        torch.cuda.manual_seed_all(value)


@functools.cache
def _device_rng() -> str:
    """Which device's RNG `seed_window` seeds besides the host's: none, cuda, or other (left to `set_seed`)."""
    from accelerate.utils import is_torch_xla_available

    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else "unknown"
    if current is None and not is_torch_xla_available():
        return "none"
    return "cuda" if getattr(current, "type", None) == "cuda" else "other"


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    progress_file = path / PROGRESS_FILE
    if not progress_file.is_file():
        return f"no {PROGRESS_FILE} (the save did not finish)"
    try:
        progress = read_progress(path)
    except (ValueError, TypeError) as err:
        return f"unreadable {PROGRESS_FILE} ({err})"
    missing = [f"{STATE_DIR}/random_states_{i}.pkl" for i in range(progress.num_processes)]
    missing = [name for name in missing if not (path / name).is_file()]
    if not (path / MODEL_DIR / "config.json").is_file():
        missing.append(f"{MODEL_DIR}/config.json")
    if not (path / "config.yaml").is_file():
        missing.append("config.yaml")
    return f"missing {', '.join(missing)}" if missing else None


def read_progress(path: Path) -> Progress:
    raw = json.loads((path / PROGRESS_FILE).read_text())
    known = {f.name for f in fields(Progress)}
    return Progress(**{k: v for k, v in raw.items() if k in known})


def list_checkpoints(run_dir: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped with a warning."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((int(match.group(1)), path))
        elif warn:
            warnings.warn(f"ignoring checkpoint {path}: {problem}", stacklevel=2)
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: str | None, run_dir: Path) -> Path | None:
    """The checkpoint dir `train.resume_from` names; None = start fresh (also `latest` with none saved yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        complete = list_checkpoints(run_dir)
        return complete[-1] if complete else None
    path = Path(resume_from)
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / PROGRESS_FILE).exists():  # a run dir: its newest
        complete = list_checkpoints(path)
        if not complete:
            raise UserError(f"train.resume_from={resume_from}: this run dir holds no complete checkpoint.")
        return complete[-1]
    if not path.is_dir():
        raise UserError(f"train.resume_from={resume_from}: no such checkpoint dir; give latest or a step_N dir.")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"train.resume_from={resume_from} is not a complete checkpoint: {problem}.")
    return path


def config_changes(checkpoint: Path, current: dict) -> list[str]:
    """Run-defining keys whose value differs between the checkpoint's config and `current` (a config dict)."""
    saved = dict(flatten(read_yaml(checkpoint / "config.yaml")))
    now = dict(flatten(current))
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RUN_DEFINING_KEYS) and saved.get(key) != now.get(key):
            changed.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changed


def geometry_changes(saved: Progress, now: Progress) -> list[str]:
    """Batch geometry (processes, micro-batch, accumulation) that differs between two launches."""
    pairs = {
        "processes": (saved.num_processes, now.num_processes),
        "micro-batch size": (saved.micro_batch_size, now.micro_batch_size),
        "accumulation steps": (saved.accumulation_steps, now.accumulation_steps),
    }
    return [f"{name}: {old} -> {new}" for name, (old, new) in pairs.items() if old != new]


def refuse_changes(changes: list[str], checkpoint: Path) -> None:
    if changes:
        raise UserError(
            f"resuming from {checkpoint} with a different run: "
            + "; ".join(changes)
            + ". Resume with the checkpoint's settings, start a new run in another output.dir, "
            "or set train.resume_allow_changes=true to resume anyway."
        )


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
        target = run_dir / CHECKPOINTS_DIR / checkpoint_name(progress.step)
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
                save_config(cfg, into / "config.yaml")

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


def keep_weights_once(accelerator: Accelerator) -> None:
    """Checkpoints hold the weights once, in model/: `save_state` skips them and `load_state` reads model/.

    Only the weights Accelerate itself would write are affected (one process or DDP); DeepSpeed and FSDP save
    their sharded model state through their own engines, which the hooks never see. A checkpoint written before
    this (state/model.safetensors) still loads as it was written."""
    fingerprints: dict[int, str | None] = {}  # the frozen weights never change: hash them once per model

    def fingerprint(model) -> str | None:
        unwrapped = extract_model_from_parallel(model, keep_torch_compile=False)
        if id(unwrapped) not in fingerprints:
            fingerprints[id(unwrapped)] = frozen_weights_hash(unwrapped)
        return fingerprints[id(unwrapped)]

    def skip_weights(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process and models and (digest := fingerprint(models[0])) is not None:
            write_json(Path(output_dir) / BASE_MODEL_FILE, {"frozen_weights_xxh3_128": digest})
        weights.clear()

    def load_weights(models: list, input_dir: str) -> None:
        state_dir = Path(input_dir)
        if not models or (state_dir / "model.safetensors").is_file():  # an older checkpoint, weights in state/
            return
        saved = state_dir / BASE_MODEL_FILE
        if saved.is_file() and json.loads(saved.read_text())["frozen_weights_xxh3_128"] != fingerprint(models[0]):
            raise UserError(
                f"{state_dir.parent} was trained with LoRA on a different base model: the frozen weights of "
                "model.name_or_path do not hash to what the checkpoint recorded. Resume with the base model the run "
                "started from."
            )
        load_model_dir(extract_model_from_parallel(models[0], keep_torch_compile=False), state_dir.parent / MODEL_DIR)
        models.clear()

    accelerator.register_save_state_pre_hook(skip_weights)
    accelerator.register_load_state_pre_hook(load_weights)


def frozen_weights_hash(model: torch.nn.Module) -> str | None:
    """xxh3-128 of every frozen parameter (name, dtype, shape, bytes), or None when all of them train."""
    import xxhash

    digest, frozen = xxhash.xxh3_128(), False
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        frozen = True
        tensor = param.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest() if frozen else None


def load_model_dir(model: torch.nn.Module, model_dir: Path) -> None:
    """Copy the weights a checkpoint's model/ holds into `model` (the unwrapped training model), bitwise.

    model/ is what `finetune.modeling.write_model` wrote: a peft adapter, or save_pretrained safetensors
    (one file or shards); tied weights saved once are filled through their tie."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise UserError(f"{adapter} does not fit the model: unexpected {', '.join(result.unexpected_keys[:3])}")
        return
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no model*.safetensors weights.")
    state = {name: tensor for file in files for name, tensor in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in missing if name not in params or id(params[name]) not in loaded]  # ties are fine
    problems = [f"{kind} {', '.join(names[:3])}" for kind, names in (("missing", missing), ("unexpected", unexpected))]
    if missing or unexpected:
        raise UserError(f"{model_dir} does not fit the model: {'; '.join(problems)}")


def metric_value(path: Path, metric: str) -> float | None:
    """The checkpoint's `metric`, or None if it was not evaluated or the value is not finite."""
    value = (read_progress(path).metrics or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_checkpoint(checkpoints: list[Path], metric: str) -> Path | None:
    scored = [(value, path) for path in checkpoints if (value := metric_value(path, metric)) is not None]
    if not scored:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    # Ties go to the earlier checkpoint, as Trainer's best-model tracking does.
    return pick(scored, key=lambda item: item[0])[1]


def prune(run_dir: Path, keep_last: int, metric: str) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best; (re)point `checkpoints/best`."""
    root = run_dir / CHECKPOINTS_DIR
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".tmp-delete-*")]:  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
    checkpoints = list_checkpoints(run_dir, warn=False)
    best = best_checkpoint(checkpoints, metric)
    keep = set(checkpoints[-keep_last:]) | ({best} if best else set())
    for path in checkpoints:
        if path not in keep:
            doomed = path.with_name(f".tmp-delete-{path.name}")  # never a half-deleted dir that looks complete
            path.rename(doomed)
            shutil.rmtree(doomed)
    link = root / BEST_LINK
    if best is None:
        link.unlink(missing_ok=True)
        return
    tmp_link = link.with_name(f".tmp-{BEST_LINK}")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(best.name, target_is_directory=True)
    tmp_link.replace(link)  # atomic: `best` always names a complete checkpoint


def load_checkpoint(accelerator: Accelerator, scheduler, checkpoint: Path) -> Progress:
    """Restore model, optimizer, scheduler, scaler and RNG states (every process); return where training stood."""
    try:
        accelerator.load_state(str(checkpoint / STATE_DIR))
        if (checkpoint / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(json.loads((checkpoint / SCHEDULER_FILE).read_text()))
    except UserError:
        raise
    except Exception as err:  # torch, safetensors and Accelerate raise many types for a damaged file
        raise UserError(
            f"could not load checkpoint {checkpoint}: {first_line(err)}. "
            "Resume from another one: train.resume_from=<run>/checkpoints/step_N."
        ) from None
    return read_progress(checkpoint)


def resume(accelerator: Accelerator, scheduler, checkpoint: Path, now: Progress, allow_changes: bool) -> Progress:
    """Load `checkpoint` into the prepared objects; `now` (this launch's geometry) continued from its position."""
    saved = load_checkpoint(accelerator, scheduler, checkpoint)
    if not allow_changes:
        refuse_changes(geometry_changes(saved, now), checkpoint)
    return replace(
        now,
        step=saved.step,
        epoch=saved.epoch,
        batches_into_epoch=saved.batches_into_epoch,
        samples_seen=saved.samples_seen,
        best_value=saved.best_value,
        best_step=saved.best_step,
        reference_value=saved.reference_value,
        evals_without_improvement=saved.evals_without_improvement,
    )


def resume_command(script: str, argv: list[str], num_processes: int) -> str:
    """What to run to continue: the same command with train.resume_from=latest."""
    args = [a for a in argv if not a.startswith("train.resume_from=")]
    command = shlex.join(["accelerate", "launch", script, *args, "train.resume_from=latest"])
    launcher = " (with the same launcher options)" if num_processes > 1 else ""
    return f"Resume with{launcher}:\n  {command}"


def trim_metrics_log(path: Path, step: int) -> None:
    """Drop log records after `step` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
