"""finetune.core.token_cache: a second tokenization of the same data is a cache hit; any change is a miss."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from finetune.classify.data import tokenize
from finetune.core import token_cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(token_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts the tokenizations that really ran."""
    calls: list[int] = []
    real = Dataset.map

    def counting_map(self, *args, **kwargs):
        if kwargs.get("desc") == "Tokenizing":
            calls.append(len(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", counting_map)
    return calls


def examples(texts: list[str]) -> Dataset:
    return Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})


def test_the_same_data_and_tokenizer_is_tokenized_once(tiny_bert, cache, builds):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["the red apple", "a very old bus on my cow", "cat"]
    first = tokenize(examples(texts), tokenizer, max_length=4)
    again = tokenize(examples(texts), AutoTokenizer.from_pretrained(tiny_bert), max_length=4)
    assert builds == [3], "the second run loads the first one's result"
    assert again.to_dict() == first.to_dict() and again.features == first.features
    assert len(list(cache.iterdir())) == 1

    tokenize(examples(texts), tokenizer, max_length=5)  # another setting
    tokenize(examples([*texts[:2], "dog"]), tokenizer, max_length=4)  # other content
    tokenize(examples(texts).select([2, 1, 0]), tokenizer, max_length=4)  # other order (an indices mapping)
    assert builds == [3, 3, 3, 3]


def test_a_tokenizer_is_the_same_after_it_truncated_and_differs_with_a_new_token(tiny_bert, cache):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    before = token_cache.tokenizer_hash(tokenizer)
    tokenizer(["a b c d e f"], truncation=True, max_length=3)  # sets the fast tokenizer's truncation state
    assert token_cache.tokenizer_hash(tokenizer) == before
    tokenizer.add_tokens(["zebra"])
    assert token_cache.tokenizer_hash(tokenizer) != before


def test_the_cache_can_be_turned_off(tiny_bert, monkeypatch, builds):
    monkeypatch.setenv(token_cache.CACHE_ENV, "off")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    for _ in range(2):
        tokenize(examples(["the red apple", "cat"]), tokenizer, max_length=8)
    assert builds == [2, 2]


def test_sft_tokenization_and_its_report_come_back_from_the_cache(cache, builds):
    from test_lm_data import make_tokenizer

    from finetune.core.config import build_config
    from finetune.core.schemas import SFTDataConfig
    from finetune.lm.tokenize import tokenize_sft

    chats = [
        {"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in ("abc", "hello", "xy" * 30)
    ]
    cfg = build_config(SFTDataConfig, [("test", {"max_length": 24})])
    first, first_report = tokenize_sft(Dataset.from_list(chats), make_tokenizer(), cfg)
    again, again_report = tokenize_sft(Dataset.from_list(chats), make_tokenizer(), cfg)
    assert builds == [3] and again_report == first_report
    assert first_report.examples == 3 and first_report.kept + first_report.dropped_no_targets == 3
    assert again.to_dict() == first.to_dict()
