"""Data any recipe reads: local files, class folders or Hub datasets; a length-grouped sampler; dataloaders.

What a task does with the rows lives with the task: `finetune.classify.data`, `finetune.lm.data`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from finetune.core.errors import UserError, first_line
from finetune.core.paths import local_path, looks_like_path

# File suffix -> (datasets builder, builder kwargs). TSV is read without quoting, as GLUE ships it.
TABLE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t", "quoting": 3}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
# Columns a class-folder corpus is read into.
FOLDER_TEXT, FOLDER_LABEL = "text", "label"


def read_class_folders(root: Path, key: str) -> Dataset:
    """A folder with one sub-folder per class, each holding .txt files: label = sub-folder name."""
    texts, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for file in sorted(class_dir.glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
            labels.append(class_dir.name)
    if not texts:
        raise UserError(
            f"{key}: {root} is a folder but holds no <class>/<file>.txt files. A class-folder corpus has one "
            "sub-folder per class with one .txt file per example; otherwise point to a data file."
        )
    return Dataset.from_dict({FOLDER_TEXT: texts, FOLDER_LABEL: labels})


def read_table(path: Path, key: str) -> Dataset:
    """A .csv/.tsv/.json/.jsonl/.parquet file as a Dataset."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise UserError(f"{key}: {path} has an unsupported suffix {suffix!r}; use one of {', '.join(TABLE_FORMATS)}.")
    builder, kwargs = TABLE_FORMATS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # the parsers (pandas, pyarrow) raise many types for a bad file
        raise UserError(f"{key}: could not read {path} as {suffix[1:]}: {first_line(err)}") from None


def read_hub(dataset_id: str, config_name: str | None, split: str, key: str) -> Dataset:
    """A split of a Hub dataset (needs network unless it is already in the local cache)."""
    try:
        return datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as err:  # network, missing config or split: datasets raises many types
        what = f"{dataset_id!r}" + (f" (config {config_name!r})" if config_name else "") + f" split {split!r}"
        raise UserError(
            f"{key}: could not load Hub dataset {what}: {first_line(err)}. "
            "Offline, only datasets already in the Hugging Face cache load; a local file or folder always does."
        ) from None


def is_hub_dataset(spec: str, key: str) -> bool:
    """True when `spec` names a Hub dataset rather than a local file or folder."""
    return local_path(spec, key) is None and not looks_like_path(spec)


def read_source(spec: str, key: str, hub_config: str | None = None, hub_split: str = "train") -> Dataset:
    """Read what a data key names: a local file, a class-folder corpus, or a Hub dataset split."""
    path = local_path(spec, key)
    if path is None:
        if looks_like_path(spec):
            raise UserError(f"{key}: file or folder not found: {spec}. Check the path (relative to {Path.cwd()}).")
        return read_hub(spec, hub_config, hub_split, key)
    return read_class_folders(path, key) if path.is_dir() else read_table(path, key)


def read_validation(cfg) -> Dataset:
    """The rows data.validation names: a file or folder, or a split of data.train's Hub dataset."""
    if is_hub_dataset(cfg.train, "data.train"):  # then data.validation names a split of the same dataset
        return read_hub(cfg.train, cfg.hub_config, cfg.validation, "data.validation")
    return read_source(cfg.validation, "data.validation")


# --------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------


def column(ds: Dataset, name: str) -> list:
    """Every value of column `name`, read by Arrow at once (iterating `ds[name]` decodes row by row: seconds
    for tens of thousands of rows)."""
    return ds.select_columns([name])[:][name]


def token_lengths(ds: Dataset) -> list[int]:
    """len(input_ids) of every example, computed by Arrow; a `length` column where the examples hold several
    sequences (a preference pair: its longer one)."""
    import pyarrow.compute as pc

    if "input_ids" not in ds.column_names and "length" in ds.column_names:
        return column(ds, "length")
    table = ds.select_columns(["input_ids"]).with_format("arrow")[:]
    return pc.list_value_length(table["input_ids"]).to_pylist()


def length_grouped_order(
    lengths: list[int], batch_size: int, generator: torch.Generator, batches_per_group: int = 64
) -> list[int]:
    """A random order in which each run of `batch_size` examples has similar lengths.

    Shuffle; cut into groups of `batches_per_group` batches; sort each group by length and cut it into
    batches; shuffle the batches (the longest first, so that running out of memory happens at once).
    Unlike transformers' `get_length_grouped_indices` (groups of at most 50 batches, batches in length
    order within a group), the batch order is random and the large groups leave almost no padding.
    """
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * batches_per_group
    batches = []
    for start in range(0, len(permutation), group):
        chunk = sorted(permutation[start : start + group], key=lengths.__getitem__, reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]  # at most one: kept last, so batches stay aligned
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if full:
        longest = max(range(len(full)), key=lambda i: lengths[full[i][0]])
        full[0], full[longest] = full[longest], full[0]
    return [i for batch in full + short for i in batch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in `length_grouped_order`, drawn from `seed + epoch` alone (so an epoch's order does not
    depend on how often the sampler was iterated before: resumable, and the same on every process)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))


def make_dataloader(
    ds: Dataset,
    batch_size: int,
    collate_fn: Callable[[list[dict]], dict],
    shuffle: bool = False,
    num_workers: int | str = 0,
    group_by_length: bool = False,
    seed: int = 0,
    global_batch_size: int | None = None,
    longest_first: bool = False,
) -> DataLoader:
    """Batches of `ds` put together by `collate_fn` (which pads them to their own longest example).

    `shuffle` with `group_by_length` draws batches of similar length (far less padding); plain `shuffle`
    is a uniform permutation (which Accelerate seeds per epoch when prepared). Length groups are sized
    by `global_batch_size`, so the order of examples is the same however the global batch is split into
    micro-batches, accumulation steps and processes.

    `num_workers="auto"`: 2 worker processes on a GPU machine, none on a CPU.
    `longest_first` (evaluation): examples in decreasing length, so that each batch is padded to little more
    than its own lengths (about half the tokens of dataset order on short sentences), and the largest batch,
    where memory peaks, comes first.
    """
    sampler = None
    if longest_first:
        lengths = token_lengths(ds)
        sampler = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    elif shuffle and group_by_length:
        lengths = token_lengths(ds)
        sampler = LengthGroupedSampler(lengths, global_batch_size or batch_size, seed)
        shuffle = False
    on_gpu = torch.cuda.is_available()
    if num_workers == "auto":
        num_workers = 2 if on_gpu else 0
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=on_gpu,  # page-locked batches: the copy to the GPU runs without blocking (make_accelerator)
    )


class CollatedOnce:
    """An evaluation loader (unprepared, unshuffled) whose batches are collated on the first pass and replayed
    from memory at every later evaluation: the same tensors, without padding them again."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.batches: list[dict] | None = None

    def __iter__(self):
        if self.batches is None:
            self.batches = list(self.loader)
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.loader)


def longest_batch(ds: Dataset, collate_fn: Callable[[list[dict]], dict], size: int, device: torch.device) -> dict:
    """A batch of the `size` longest examples of `ds`, on `device`: the most memory a batch of `size` takes."""
    lengths = token_lengths(ds)
    longest = sorted(range(len(lengths)), key=lengths.__getitem__)[-size:]
    batch = collate_fn([ds[i] for i in longest])
    return {name: tensor.to(device) for name, tensor in batch.items()}


PERCENTILES = (50, 90, 99)


def describe_lengths(lengths: Sequence[int], max_length: int | None = None, kept: str = "truncated") -> str:
    """'token lengths p50 118, p90 402, p99 870, max 2,301; 37 of 1,000 (3.7%) longer than 512 (truncated)'."""
    if not len(lengths):
        return "no examples"
    values = np.asarray(lengths)
    points = ", ".join(f"p{p} {int(np.percentile(values, p)):,}" for p in PERCENTILES)
    if max_length is None:
        return f"token lengths {points}, max {int(values.max()):,}"
    longer = int((values > max_length).sum())
    share = f"{longer:,} of {len(values):,} ({longer / len(values):.1%})"
    return f"token lengths {points}, max {int(values.max()):,}; {share} longer than {max_length:,} ({kept})"


def split_validation(train: Dataset, cfg, stratify: bool = False) -> tuple[Dataset, Dataset]:
    """(train, validation): data.validation_fraction of train held out, drawn with data.split_seed; stratified by
    the `label` column (classification) or plain random."""
    kind = "stratified " if stratify else ""
    try:
        split = train.train_test_split(
            test_size=cfg.validation_fraction, seed=cfg.split_seed, stratify_by_column="label" if stratify else None
        )
    except ValueError as err:
        raise UserError(
            f"data.validation_fraction={cfg.validation_fraction}: cannot carve a {kind}validation split "
            f"from {len(train)} training examples ({err}). Give data.validation or more data."
        ) from None
    return split["train"], split["test"]
