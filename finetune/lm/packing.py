"""Packing tokenized examples into rows of max_length (best fit decreasing), kept apart by position ids."""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from finetune.training.accumulation import IGNORE_INDEX

# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int | None = None) -> list[list[int]]:
    """Bins (lists of indices) of total length <= capacity: longest item first, each into the fullest bin it fits.

    Deterministic: ties keep input order (or the order of a permutation drawn from `seed`). Best-fit decreasing
    packs as tightly as first-fit decreasing (both use at most 11/9 of the optimal bins + 1) and, keyed by free
    space, finds the bin with a bisect instead of a scan; it is TRL's default ("bfd") too.
    """
    order = np.arange(len(lengths))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with that much room
    spaces: list[int] = []  # sorted keys of by_space
    for i in order.tolist():
        size = int(lengths[i])
        k = bisect_left(spaces, size)
        if k == len(spaces):
            b, room = len(bins), capacity - size
            bins.append([i])
        else:
            old = spaces[k]
            group = by_space[old]
            b, room = group.pop(), old - size
            if not group:
                del by_space[old]
                spaces.pop(k)
            bins[b].append(i)
        if room > 0:
            if room in by_space:
                by_space[room].append(b)
            else:
                by_space[room] = [b]
                insort(spaces, room)
    return bins


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    cls = pa.LargeListArray if offsets[-1] >= 2**31 else pa.ListArray
    return cls.from_arrays(pa.array(offsets, type=pa.int64() if cls is pa.LargeListArray else pa.int32()), values)


def pack_examples(ds: Dataset, max_length: int, seed: int | None = None) -> Dataset:
    """Tokenized examples packed into rows of at most `max_length` tokens, by `best_fit_decreasing`.

    Columns: input_ids, labels, position_ids (0, 1, ... restarting at every example, from which transformers
    builds block-diagonal causal attention, see `SFTCollator`) and num_examples. No example is split across
    rows. The label of each example's first token is -100: the shifted loss would otherwise predict it from the
    previous example's last token. An example's first label is never a loss term unpacked either, so a packed
    row has exactly the loss terms (`labels[1:] != -100`) of its examples, and the loss does not change.
    """
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]  # honours an indices mapping
    ids_col, labels_col = (table.column(c).combine_chunks() for c in ("input_ids", "labels"))
    lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than the packed rows' {max_length}")
    if len(lengths) and lengths.min() == 0:
        raise ValueError("cannot pack empty examples")
    bins = best_fit_decreasing(lengths, max_length, seed)

    # The examples in packing order, end to end, then cut into rows: arrow's take keeps this vectorised.
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    sizes = lengths[order]
    starts = np.cumsum(sizes) - sizes  # where each example lands in the packed token stream
    total = int(sizes.sum())
    take = pa.array(order)
    packed_ids = ids_col.take(take).flatten()
    packed_labels = labels_col.take(take).flatten().to_numpy(zero_copy_only=False).copy()
    packed_labels[starts] = IGNORE_INDEX
    steps = np.ones(total, dtype=np.int32)  # positions 0, 1, ... per example, as a cumulative sum of steps
    if total:
        steps[starts] = 0
        steps[starts[1:]] = 1 - sizes[:-1]
    position_ids = np.cumsum(steps, dtype=np.int32)

    num_examples = np.asarray([len(b) for b in bins], dtype=np.int32)
    first_of_row = np.cumsum(num_examples) - num_examples
    row_sizes = np.add.reduceat(sizes, first_of_row) if len(bins) else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int64)
    packed = pa.table(
        {
            "input_ids": _list_array(offsets, packed_ids),
            "labels": _list_array(offsets, pa.array(packed_labels)),
            "position_ids": _list_array(offsets, pa.array(position_ids)),
            "num_examples": pa.array(num_examples),
        }
    )
    # A fingerprint from the input's saves datasets from hashing every token of the table.
    fingerprint = Hasher.hash(["pack_examples", ds._fingerprint, max_length, seed])
    return Dataset(InMemoryTable(packed), fingerprint=fingerprint)
