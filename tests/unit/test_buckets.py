"""finetune.core.buckets: batches padded to a few lengths (static shapes for train.compile=true), by both collators."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.core.buckets import LengthBuckets
from finetune.lm.collate import SFTCollator
from finetune.training.accumulation import IGNORE_INDEX


def test_buckets_are_powers_of_two_up_to_max_length_and_a_short_batch_gets_the_longest():
    buckets = LengthBuckets.up_to(100, batch_size=8)
    assert buckets.lengths == (16, 32, 64, 100) and buckets.shapes == 5
    assert [buckets.width(n, 8) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
    assert buckets.width(3, 5) == 100  # the epoch's short last batch: one shape, whatever its lengths
    assert LengthBuckets.up_to(16, 4).lengths == (16,)
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        buckets.width(101, 8)


def test_collators_pad_to_the_bucket(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    buckets = LengthBuckets.up_to(64, batch_size=2)
    features = [{"input_ids": [2, 5, 3], "labels": 1}, {"input_ids": [2, 5, 6, 7, 3], "labels": 0}]
    batch = padding_collator(tokenizer, buckets=buckets)(features)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum().item() == 8
    assert padding_collator(tokenizer, buckets=buckets)(features[:1])["input_ids"].shape == (1, 64)
    sft = SFTCollator(pad_token_id=0, buckets=buckets)([{"input_ids": [1] * 20, "labels": [1] * 20}] * 2)
    assert sft["input_ids"].shape == (2, 32) and (sft["labels"][:, 20:] == IGNORE_INDEX).all()
