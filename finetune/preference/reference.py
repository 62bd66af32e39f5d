"""The reference model of preference tuning, in one of three forms (dpo.reference), none of which trains:

- `adapter_off`: the trained model itself with its LoRA adapters switched off (peft's `disable_adapter`), under
  `no_grad`: one copy of the weights, 4-bit under QLoRA. At step 0 the policy equals it (LoRA's B is zero).
- `precomputed`: every pair's reference log-probs computed once, before training, by the model as loaded, and
  kept beside the data (`ref_logps`): no reference model in memory while training. The values are cached on
  disk (`$FINETUNE_CACHE/reference/`), keyed like tokenized data (the token cache's rules): the pairs' tokens,
  a hash of the weights, the settings that change the numbers and the source of the code that computes them.
  The file is written whole and renamed into place, so a run killed during the pass leaves nothing and the
  next start computes again; a resumed or repeated run with the same key reads it.
- `model`: a second, frozen copy loaded beside the policy (its memory shows in the dry run).

Every form computes log-probs the same way (`sequence_logps`), in eval mode (no dropout) and under the run's
autocast, so a precomputed value equals the live one up to how a batch is padded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset

from finetune.core import token_cache
from finetune.core.data import make_dataloader
from finetune.core.errors import UserError
from finetune.preference import loss as preference_loss
from finetune.preference.collate import ANSWER_TOKENS, REFERENCE_COLUMN
from finetune.preference.loss import sequence_logps
from finetune.preference.setup import reference_settings
from finetune.training.checkpoints.weights import parameters_hash


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout) and without gradients for the block; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class PrecomputedReference:
    """Reference log-probs carried by the batch (`ref_logps`, (B, 2))."""

    def logps(self, model, batch: dict) -> torch.Tensor:
        if REFERENCE_COLUMN not in batch:
            raise RuntimeError("a batch without precomputed reference log-probs (ref_logps)")
        return batch[REFERENCE_COLUMN]


class AdapterOffReference:
    """The policy with its LoRA adapters switched off."""

    def logps(self, model, batch: dict) -> torch.Tensor:
        peft_model = extract_model_from_parallel(model)  # through DDP, DeepSpeed and compile, to the peft model
        if not hasattr(peft_model, "disable_adapter"):
            raise UserError("dpo.reference=adapter_off needs a LoRA model (lora.enabled=true)")
        with evaluation_mode(model), peft_model.disable_adapter():
            return sequence_logps(model, batch)


class ModelReference:
    """A separate frozen model (on the run's device, in eval mode), run under the run's autocast."""

    def __init__(self, model: torch.nn.Module, autocast) -> None:
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast

    def logps(self, model, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return sequence_logps(self.model, batch)


@dataclass
class InitialModel:
    """What the reference (dpo.reference resolved: `kind`) needs of the model as loaded, kept before LoRA and
    `accelerator.prepare` change it: the weights' hash (precomputed) or a frozen copy (model)."""

    kind: str
    fingerprint: str | None = None
    frozen_copy: torch.nn.Module | None = None

    @classmethod
    def of(cls, kind: str, model: torch.nn.Module) -> InitialModel:
        fingerprint = weights_fingerprint(model) if kind == "precomputed" else None
        return cls(kind, fingerprint, copy.deepcopy(model) if kind == "model" else None)

    def reference(self, run, model, sets: dict[str, Dataset], collate, adapt):
        """(the reference, `sets`) once `model` is prepared: precomputed adds their `ref_logps` (cached on disk);
        `adapt` makes the frozen copy compute as the policy does (dropout off, the chunked head)."""
        cfg, accelerator = run.cfg, run.accelerator
        if self.kind == "precomputed":
            batch_size = cfg.dpo.reference_batch_size or cfg.eval.batch_size
            settings = reference_settings(cfg, accelerator)
            return PrecomputedReference(), precompute_reference(
                run, model, sets, collate, batch_size, self.fingerprint, settings
            )
        if self.kind == "adapter_off":
            return AdapterOffReference(), sets
        adapt(self.frozen_copy)
        return ModelReference(self.frozen_copy.to(accelerator.device), accelerator.autocast), sets


# --------------------------------------------------------------------------------------------
# The precomputing pass and its cache
# --------------------------------------------------------------------------------------------


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter of the model as loaded (`parameters_hash`): the reference's identity. Parameters
    DeepSpeed ZeRO-3 partitioned as they loaded are not here whole: their checkpoint files stand in."""
    if any(hasattr(param, "ds_numel") for param in model.parameters()):
        return _files_fingerprint(getattr(model, "name_or_path", "") or "")
    return parameters_hash(model.named_parameters())


def _files_fingerprint(name_or_path: str) -> str:
    """The name, size and modification time of each weights file of a local model dir (a Hub id: its name, and the
    revision the settings hold)."""
    root = Path(name_or_path)
    digest = hashlib.blake2b(name_or_path.encode(), digest_size=16)
    for file in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cache_file(sets: dict[str, Dataset], fingerprint: str, settings: dict) -> Path | None:
    """Where the reference log-probs of `sets` are cached (None when the cache is off): a key of the pairs' tokens,
    the weights, the settings and the source of the code that computes them."""
    root = token_cache.cache_root()
    if root is None:
        return None
    key = hashlib.blake2b(digest_size=16)
    for name, ds in sorted(sets.items()):
        tokens = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        key.update(f"{name}:{token_cache.content_hash(tokens)};".encode())
    key.update(fingerprint.encode())
    key.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for module in (preference_loss, inspect.getmodule(cache_file)):
        key.update(Path(inspect.getsourcefile(module)).read_bytes())
    return root.parent / "reference" / f"{key.hexdigest()}.safetensors"


def pair_values(accelerator, batches: list[dict], logps) -> torch.Tensor:
    """(N, 2) `logps(batch)` of every pair of `batches` (collated, in order), on the CPU: each process runs every W-th
    batch, all as many (under FSDP/ZeRO-3 each forward is a collective), then one all-reduce puts them together."""
    world, rank = accelerator.num_processes, accelerator.process_index
    sizes = [len(batch[ANSWER_TOKENS]) for batch in batches]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    out = torch.zeros(sum(sizes), 2, dtype=torch.float64, device=accelerator.device)
    for i in range(math.ceil(len(batches) / world)):
        index = i * world + rank
        batch = batches[min(index, len(batches) - 1)]  # a process past the end repeats the last, not counted
        values = logps({name: tensor.to(accelerator.device) for name, tensor in batch.items()})
        if index < len(batches):
            out[starts[index] : starts[index] + sizes[index]] = values.double()
    if world > 1:
        out = accelerator.reduce(out, reduction="sum")
    return out.float().cpu()


def _computed(accelerator, model, ds: Dataset, collate, batch_size: int) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair of `ds`, in order, by `model` in eval mode under the run's autocast."""
    without = ds.remove_columns([c for c in ds.column_names if c == REFERENCE_COLUMN])
    batches = list(make_dataloader(without, batch_size, collate))
    with evaluation_mode(model), accelerator.autocast():
        return pair_values(accelerator, batches, lambda batch: sequence_logps(model, batch))


def precompute_reference(
    run, model, sets: dict[str, Dataset], collate, batch_size: int, fingerprint: str, settings: dict
) -> dict[str, Dataset]:
    """`sets` with a `ref_logps` column [chosen, rejected] per pair: read from the cache, or computed by `model`
    (prepared, before any training step) and cached."""
    from safetensors.torch import load_file, save_file

    accelerator, log = run.accelerator, run.log
    path = cache_file(sets, fingerprint, settings)
    values = None
    if path is not None and path.is_file():
        try:
            values = load_file(path)
            if any(name not in values or len(values[name]) != len(ds) for name, ds in sets.items()):
                values = None
        except Exception:  # noqa: BLE001  (a damaged file: computed again)
            values = None
        if values is not None:
            log.info(f"reference log-probs: read from {path}")
    if values is None:
        counts = ", ".join(f"{len(ds):,} {name}" for name, ds in sets.items())
        log.info(f"reference log-probs: one pass over {counts} pairs, in batches of {batch_size}")
        values = {name: _computed(accelerator, model, ds, collate, batch_size) for name, ds in sets.items()}
        if path is not None and accelerator.is_main_process:
            _write_atomically(path, values, save_file)
            log.info(f"reference log-probs: cached in {path}")
        accelerator.wait_for_everyone()
    return {name: _with_reference(ds, values[name]) for name, ds in sets.items()}


def _write_atomically(path: Path, values: dict[str, torch.Tensor], save_file) -> None:
    """Written to a temporary file and renamed into place: a run killed meanwhile leaves no partial entry."""
    tmp = path.with_name(f".tmp-{path.stem}-{uuid.uuid4().hex[:8]}.safetensors")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in values.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the run goes on uncached
        tmp.unlink(missing_ok=True)


def _with_reference(ds: Dataset, values: torch.Tensor) -> Dataset:
    if REFERENCE_COLUMN in ds.column_names:
        ds = ds.remove_columns(REFERENCE_COLUMN)
    return ds.add_column(REFERENCE_COLUMN, values.tolist())
