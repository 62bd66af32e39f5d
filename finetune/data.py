"""Data for the recipes: read local files, class folders or Hub datasets; map labels; tokenize; batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Value
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from finetune.errors import UserError, first_line
from finetune.paths import local_path, looks_like_path

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


# --------------------------------------------------------------------------------------------
# Classification data
# --------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    """Train and validation examples with columns text (, text_pair), label: int ids 0..n-1, or float32
    scores for regression."""

    train: Dataset
    validation: Dataset
    label_names: list[str]  # empty for regression
    task: str = "classification"

    @property
    def num_outputs(self) -> int:
        """Outputs of the model's head: one score for regression, one logit per class otherwise."""
        return 1 if self.task == "regression" else len(self.label_names)


def _select_columns(ds: Dataset, text: str, pair: str | None, label: str | None, key: str) -> Dataset:
    wanted = {"data.text_column": text, "data.text_pair_column": pair, "data.label_column": label}
    missing = [f"{k}={v!r}" for k, v in wanted.items() if v and v not in ds.column_names]
    if missing:
        raise UserError(
            f"{key}: column {' and '.join(missing)} not found; the columns are: {', '.join(ds.column_names)}. "
            "Set the column keys to the names your data uses."
        )
    rename = {text: "text", **({pair: "text_pair"} if pair else {}), **({label: "label"} if label else {})}
    ds = ds.select_columns(list(rename))
    return ds.rename_columns({k: v for k, v in rename.items() if k != v})


def _drop_empty(ds: Dataset, key: str, has_labels: bool = True) -> Dataset:
    def keep(row: dict) -> bool:
        texts_ok = all(isinstance(row[c], str) and row[c].strip() for c in ("text", "text_pair") if c in row)
        return texts_ok and (not has_labels or row["label"] is not None)

    kept = ds.filter(keep, keep_in_memory=True)
    if len(kept) == 0:
        raise UserError(
            f"{key}: no examples left after dropping rows with empty text or no label ({len(ds)} rows read)."
        )
    return kept


def label_vocabulary(values: list, label_names: list[str], key: str) -> list[str]:
    """Names of the classes, in id order, from the training labels (and data.label_names if given)."""
    if all(isinstance(v, (int, bool)) for v in values):
        top = max(int(v) for v in values)
        if min(int(v) for v in values) < 0:
            raise UserError(f"{key}: int labels must be 0..n-1; found {min(values)}.")
        if label_names:
            if top >= len(label_names):
                raise UserError(f"{key}: label id {top} has no name: data.label_names lists {len(label_names)} names.")
            return list(label_names)
        return [str(i) for i in range(top + 1)]
    if all(isinstance(v, str) for v in values):
        found = sorted(set(values))
        if label_names:
            unknown = sorted(set(found) - set(label_names))
            if unknown:
                raise UserError(f"{key}: labels {unknown} are not in data.label_names {label_names}.")
            return list(label_names)
        return found
    fractional = next((v for v in values if isinstance(v, float) and not v.is_integer()), None)
    if fractional is not None:
        raise UserError(
            f"{key}: labels are numbers such as {fractional!r}, not class ids or names. To predict a score, "
            "set data.task=regression; to classify, give int ids or names."
        )
    kinds = sorted({type(v).__name__ for v in values})
    raise UserError(f"{key}: labels must be all ints or all strings; found {', '.join(kinds)}.")


def encode_labels(ds: Dataset, label_names: list[str], key: str, seen_in_train: set[int] | None = None) -> Dataset:
    """Replace label values by ids 0..n-1; labels unknown to the training set are an error."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    unknown = Counter()
    for value in ds["label"]:
        label_id = int(value) if isinstance(value, (int, bool)) else index.get(value)
        if label_id is None or not 0 <= label_id < len(label_names):
            unknown[value] += 1
        else:
            ids.append(label_id)
    if seen_in_train is not None:
        for label_id in set(ids) - seen_in_train:
            unknown[label_names[label_id]] += ids.count(label_id)
    if unknown:
        listed = ", ".join(f"{v!r} ({n}x)" for v, n in unknown.most_common(10))
        raise UserError(
            f"{key}: label(s) never seen in training: {listed}. Training labels: {', '.join(label_names)}. "
            "Fix the data or train on data that has these classes."
        )
    ds = ds.remove_columns("label").add_column("label", ids)
    return ds.cast_column("label", ClassLabel(names=label_names))


def regression_labels(ds: Dataset, key: str, label_column: str) -> Dataset:
    """The `label` column as float32 scores; anything but finite numbers (ints or floats) is an error."""
    feature = ds.features["label"]
    dtype = feature.dtype if isinstance(feature, Value) else type(feature).__name__
    if not dtype.startswith(("int", "uint", "float")):  # bool, string, null, nested: not a score
        example = next((v for v in ds["label"] if v is not None), None)
        raise UserError(
            f"{key}: data.label_column={label_column!r} must hold numbers for data.task=regression; found "
            f"{dtype} values such as {example!r}. Give scores as numbers, or use data.task=classification."
        )
    scores = np.asarray(ds["label"], dtype=np.float64)
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise UserError(
            f"{key}: data.label_column={label_column!r} has no finite score in row {row} ({scores[row]}); "
            "give every example a number."
        )
    return ds.cast_column("label", Value("float32"))


def split_validation(train: Dataset, cfg, stratify: bool) -> tuple[Dataset, Dataset]:
    """(train, validation) carved from train with data.split_seed: stratified by class, or plain random."""
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


def read_validation(cfg) -> Dataset:
    """The rows data.validation names: a file or folder, or a split of data.train's Hub dataset."""
    if is_hub_dataset(cfg.train, "data.train"):  # then data.validation names a split of the same dataset
        return read_hub(cfg.train, cfg.hub_config, cfg.validation, "data.validation")
    return read_source(cfg.validation, "data.validation")


def load_classification_data(cfg) -> ClassificationData:
    """Read, check and label-encode train and validation as `cfg` (a DataConfig) says.

    For `cfg.task == "regression"` labels are float32 scores, there are no label names, and a validation
    split carved from train is plain random (there are no classes to stratify by)."""
    regression = cfg.task == "regression"
    if regression and cfg.label_names:
        raise UserError(
            f"data.label_names={cfg.label_names}: a regression head has one output and no label names; "
            "remove data.label_names or use data.task=classification."
        )
    columns = (cfg.text_column, cfg.text_pair_column, cfg.label_column)
    train_key = f"data.train ({cfg.train})"
    train = read_source(cfg.train, "data.train", cfg.hub_config, cfg.train_split)
    train = _drop_empty(_select_columns(train, *columns, key=train_key), train_key)
    if regression:
        train, label_names = regression_labels(train, train_key, cfg.label_column), []
    else:
        label_names = label_vocabulary(train["label"], cfg.label_names, train_key)
        train = encode_labels(train, label_names, train_key)
    if cfg.validation is None:
        train, validation = split_validation(train, cfg, stratify=not regression)
        return ClassificationData(train, validation, label_names, cfg.task)
    val_key = f"data.validation ({cfg.validation})"
    validation = _drop_empty(_select_columns(read_validation(cfg), *columns, key=val_key), val_key)
    if regression:
        validation = regression_labels(validation, val_key, cfg.label_column)
    else:
        validation = encode_labels(validation, label_names, val_key, seen_in_train=set(train["label"]))
    return ClassificationData(train, validation, label_names, cfg.task)


# --------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Token ids truncated to `max_length`, no padding (batches are padded by the collator)."""
    has_pair = "text_pair" in ds.column_names

    def encode(batch: dict) -> dict:
        pair = batch["text_pair"] if has_pair else None
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        if "label" in batch:
            encoded["labels"] = batch["label"]
        return encoded

    return ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="Tokenizing")


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
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    pad_to_multiple_of: int | None = None,
    group_by_length: bool = False,
    seed: int = 0,
    global_batch_size: int | None = None,
) -> DataLoader:
    """Batches padded to their own longest example (dynamic padding), rounded up to `pad_to_multiple_of`.

    `shuffle` with `group_by_length` draws batches of similar length (far less padding); plain `shuffle`
    is a uniform permutation (which Accelerate seeds per epoch when prepared). Length groups are sized
    by `global_batch_size`, so the order of examples is the same however the global batch is split into
    micro-batches, accumulation steps and processes.
    """
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    sampler = None
    if shuffle and group_by_length:
        lengths = [len(ids) for ids in ds["input_ids"]]
        sampler = LengthGroupedSampler(lengths, global_batch_size or batch_size, seed)
        shuffle = False
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collator, num_workers=num_workers
    )


def longest_batch(ds: Dataset, tokenizer: PreTrainedTokenizerBase, size: int, device: torch.device) -> dict:
    """A batch of the `size` longest examples of `ds`, on `device`: the most memory a batch of `size` takes."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__)[-size:]
    batch = next(iter(make_dataloader(ds.select(longest), tokenizer, len(longest), shuffle=False)))
    return {name: tensor.to(device) for name, tensor in batch.items()}
