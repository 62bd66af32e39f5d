"""Text classification (and regression heads): labels, splits, tokenization, the classifier and its loss.

The generic pieces (file readers, samplers, dataloaders, LoRA) are in `finetune.core.data` and `finetune.core.modeling`;
scoring a classifier is `finetune.classify.evaluate`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, Dataset, Value
from transformers import (
    PreTrainedTokenizerBase,
)

from finetune.core.data import column, describe_lengths, read_source, read_validation, split_validation
from finetune.core.errors import UserError
from finetune.core.token_cache import cached_tokenization

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
    for value in column(ds, "label"):
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
    scores = np.asarray(column(ds, "label"), dtype=np.float64)
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise UserError(
            f"{key}: data.label_column={label_column!r} has no finite score in row {row} ({scores[row]}); "
            "give every example a number."
        )
    return ds.cast_column("label", Value("float32"))


def check_learnable(train: Dataset, label_names: list[str], key: str, label_column: str) -> None:
    """Refuse training labels that cannot teach the task: one class only (every prediction of that class would
    score accuracy 1.0 on like data), or one constant regression target."""
    if not label_names:
        scores = np.asarray(column(train, "label"), dtype=np.float64)
        if len(scores) > 1 and np.ptp(scores) == 0:
            raise UserError(
                f"{key}: every regression target in data.label_column={label_column!r} is {scores[0]:g}; "
                "a constant cannot be learned. Check the column, or the data."
            )
        return
    counts = Counter(column(train, "label"))
    if len(counts) < 2:
        only = label_names[next(iter(counts))]
        raise UserError(
            f"{key}: every training example has label {only!r}; a classifier needs at least 2 classes to learn "
            f"anything. Check data.label_column={label_column!r} and the file, or add examples of other classes."
        )


def label_counts(ds: Dataset, label_names: list[str]) -> dict[str, int]:
    """Examples per class name, in label order (classes with no example included, as 0)."""
    counts = Counter(column(ds, "label"))
    return {name: counts.get(i, 0) for i, name in enumerate(label_names)}


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
        label_names = label_vocabulary(column(train, "label"), cfg.label_names, train_key)
        train = encode_labels(train, label_names, train_key)
    check_learnable(train, label_names, train_key, cfg.label_column)
    if cfg.validation is None:
        train, validation = split_validation(train, cfg, stratify=not regression)
        return ClassificationData(train, validation, label_names, cfg.task)
    val_key = f"data.validation ({cfg.validation})"
    validation = _drop_empty(_select_columns(read_validation(cfg), *columns, key=val_key), val_key)
    if regression:
        validation = regression_labels(validation, val_key, cfg.label_column)
    else:
        validation = encode_labels(validation, label_names, val_key, seen_in_train=set(column(train, "label")))
    return ClassificationData(train, validation, label_names, cfg.task)


# --------------------------------------------------------------------------------------------
# Tokenization, batches, model, loss
# --------------------------------------------------------------------------------------------


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Token ids truncated to `max_length`, no padding (batches are padded by the collator); cached on disk
    (`finetune.core.token_cache`), so a second run with the same data and tokenizer does not tokenize again."""
    has_pair = "text_pair" in ds.column_names

    def encode(batch: dict) -> dict:
        pair = batch["text_pair"] if has_pair else None
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        if "label" in batch:
            encoded["labels"] = batch["label"]
        return encoded

    def build() -> tuple[Dataset, dict]:
        mapped = ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="Tokenizing")
        return mapped, {}

    return cached_tokenization(ds, tokenizer, {"max_length": max_length}, build, code=tokenize)[0]


def describe_data(
    data: ClassificationData, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[str], int]:
    """What the dry run says about the data: examples and label counts per split, token lengths and
    truncation; and the tokens of the longest training example after truncation (where memory peaks)."""
    lines, longest = [], 0
    for name, ds in (("train", data.train), ("validation", data.validation)):
        pair = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
        lengths = [len(ids) for ids in tokenizer(list(ds["text"]), pair, truncation=False)["input_ids"]]
        if data.task == "regression":
            scores = np.asarray(column(ds, "label"), dtype=np.float64)
            labels = f"targets mean {scores.mean():.4g}, std {scores.std():.4g}, "
            labels += f"range {scores.min():.4g}..{scores.max():.4g}"
        else:
            labels = "labels " + ", ".join(f"{k} {v:,}" for k, v in label_counts(ds, data.label_names).items())
        lines += [f"{name}: {len(ds):,} examples; {labels}", f"  {describe_lengths(lengths, max_length)}"]
        longest = max(longest, min(max(lengths, default=0), max_length)) if name == "train" else longest
    return lines, longest
