"""Batches of classification examples: dynamic padding, or a few static lengths when compiled."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from finetune.core.buckets import LengthBuckets


def padding_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None, buckets: LengthBuckets | None = None
):
    """Pads a batch to its own longest example (dynamic padding), rounded up to `pad_to_multiple_of`; or, for a
    compiled model, up to one of a few lengths (`finetune.core.buckets.LengthBuckets`)."""
    if buckets is None:
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return BucketCollator(tokenizer, buckets)


@dataclass
class BucketCollator:
    """DataCollatorWithPadding to the bucket of the batch's longest example: a bounded set of shapes."""

    tokenizer: PreTrainedTokenizerBase
    buckets: LengthBuckets

    def __call__(self, features: list[dict]) -> dict:
        width = self.buckets.width(max(len(f["input_ids"]) for f in features), len(features))
        return DataCollatorWithPadding(self.tokenizer, padding="max_length", max_length=width)(features)
