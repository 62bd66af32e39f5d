"""`train.compile=true`: torch.compile with static shapes.

A compiled model is specialised to the shapes it has seen (`dynamic=False`): every new (rows, length) shape
compiles a new graph, and past dynamo's recompile limit the model silently runs eagerly. So batches are padded
to a few lengths — powers of two from 16 up to `data.max_length`, and `data.max_length` itself — and a batch
with fewer rows than the micro-batch (the last of an epoch, always the same size) to the longest length: at most
len(buckets) + 1 shapes in training and as many in evaluation, all of them met in the first epoch.

Powers of two rather than multiples of 8: on a GPU a step of short sequences is bound by kernel launches, not
arithmetic, so the padding costs little, while each shape costs a compile (tens of seconds for a BERT-base
forward and backward) and, with `train.compile_mode=reduce-overhead`, a CUDA graph of its own.
`compiled_graphs()` counts the graphs so far; the training log reports it (`compiled_graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass

SMALLEST_BUCKET = 16


@dataclass(frozen=True)
class LengthBuckets:
    """The sequence lengths a batch is padded to, and the micro-batch size a full batch has."""

    lengths: tuple[int, ...]
    batch_size: int

    @classmethod
    def up_to(cls, max_length: int, batch_size: int) -> LengthBuckets:
        lengths, length = [], SMALLEST_BUCKET
        while length < max_length:
            lengths.append(length)
            length *= 2
        return cls((*lengths, max_length), batch_size)

    def width(self, longest: int, rows: int) -> int:
        """The padded length of a batch of `rows` rows whose longest row has `longest` tokens."""
        if rows < self.batch_size:  # the short last batch: one shape of its own
            return self.lengths[-1]
        for length in self.lengths:
            if longest <= length:
                return length
        raise ValueError(f"a row of {longest} tokens is longer than the longest bucket, {self.lengths[-1]}")

    @property
    def shapes(self) -> int:
        """How many batch shapes there can be."""
        return len(self.lengths) + 1


def dynamo_plugin(train):
    """Accelerate's TorchDynamoPlugin for `train` (a TrainConfig), or None when train.compile is off."""
    if not train.compile:
        return None
    from accelerate.utils import TorchDynamoPlugin

    mode = None if train.compile_mode == "default" else train.compile_mode
    return TorchDynamoPlugin(backend=train.compile_backend, mode=mode, dynamic=False)


def allow_recompiles(buckets: LengthBuckets, loaders: int = 2) -> None:
    """Raise dynamo's recompile limit so that every bucket of every loader (train, eval) gets its graph: past
    the limit (8 by default) dynamo would run the model eagerly without a word."""
    import torch._dynamo

    needed = buckets.shapes * loaders + 2
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def batch_collators(make_collate, compile: bool, max_length: int, *batch_sizes: int) -> list:
    """One collator per loader batch size (train, eval): `make_collate(buckets)` with static-shape buckets when
    the model is compiled (dynamo's recompile limit raised to fit them all), `make_collate(None)` otherwise."""
    if not compile:
        return [make_collate(None) for _ in batch_sizes]
    buckets = [LengthBuckets.up_to(max_length, size) for size in batch_sizes]
    allow_recompiles(buckets[0], loaders=len(buckets))
    return [make_collate(b) for b in buckets]
