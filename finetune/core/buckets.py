"""Length buckets: the few sequence lengths a batch is padded to when the model is compiled (`train.compile`).

A compiled model is specialised to the shapes it has seen (`dynamic=False`): every new (rows, length) shape
compiles a new graph. So batches are padded to a few lengths — powers of two from 16 up to `data.max_length`,
and `data.max_length` itself — and a batch with fewer rows than the micro-batch (the last of an epoch, always
the same size) to the longest length: at most len(buckets) + 1 shapes in training and as many in evaluation,
all of them met in the first epoch. Both collators (`finetune.classify.collate`, `finetune.lm.collate`) pad to
them; `finetune.core.compile` raises dynamo's recompile limit to fit them.

Powers of two rather than multiples of 8: on a GPU a step of short sequences is bound by kernel launches, not
arithmetic, so the padding costs little, while each shape costs a compile (tens of seconds for a BERT-base
forward and backward) and, with `train.compile_mode=reduce-overhead`, a CUDA graph of its own.
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
