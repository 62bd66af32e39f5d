"""finetune.core.token_cache: a second tokenization of the same data is a cache hit; any change is a miss."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from helpers import make_tokenizer
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


def test_an_empty_tokenized_set_is_saved_and_loaded_back(cache):
    """datasets saves 0 rows as no shard at all, then cannot load it: the cache gives it one."""
    empty = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]}).select([]).flatten_indices()
    built: list[int] = []

    def tokenize() -> tuple[Dataset, dict]:
        built.append(1)
        return empty, {"kept": 0}

    source = examples(["every example dropped"])
    results = [
        token_cache.cached_tokenization(source, make_tokenizer(), {"max_length": 8}, tokenize, code=examples)
        for _ in range(2)
    ]
    assert built == [1], "the second call is a cache hit"
    for tokenized, extra in results:
        assert len(tokenized) == 0 and tokenized.features == empty.features and extra == {"kept": 0}
    (entry,) = cache.iterdir()
    assert list(entry.glob("*.arrow"))


def test_sft_tokenization_that_leaves_no_example_is_refused_from_the_cache_too(cache, builds):
    from finetune.core.config import build_config
    from finetune.core.errors import UserError
    from finetune.core.schemas import SFTDataConfig
    from finetune.lm.tokenize import tokenize_sft

    pairs = Dataset.from_dict({"prompt": ["a" * 20, "b" * 30], "completion": ["x", "y"]})
    cfg = build_config(SFTDataConfig, [("test", {"max_length": 12, "too_long": "drop"})])
    for _ in range(2):
        with pytest.raises(UserError, match=r"^validation: no example left .* all 2 were dropped, 2 longer than"):
            tokenize_sft(pairs, make_tokenizer(), cfg, "validation")
    assert builds == [2], "the empty result was cached, and read back"
