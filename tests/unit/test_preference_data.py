"""Preference data: reading TRL's formats (explicit and implicit prompts, text and chat), the refusals, token ids
with completion-only targets, truncation, collation (padded and padding-free). A character-level tokenizer
(helpers.make_tokenizer) makes every token a readable character."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import make_tokenizer, write_rows

from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.schemas import DPODataConfig
from finetune.preference.collate import PreferenceCollator, pairs_in
from finetune.preference.data import check_preference_chat_template, load_preference_data
from finetune.preference.tokenize import describe_pairs, preference_generation_prompts, tokenize_pairs
from finetune.training.accumulation import IGNORE_INDEX

USER = {"role": "user", "content": "2+2?"}
RIGHT, WRONG = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def dpo_config(**values) -> DPODataConfig:
    return build_config(DPODataConfig, [("test", values)])


def load(tmp_path, rows: list[dict], name: str = "pairs.jsonl", **values):
    path = str(write_rows(tmp_path / name, rows))
    return load_preference_data(dpo_config(**{"train": path, "validation": path, **values}))


def text_of(tokenizer, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def targets(tokenizer, labels) -> str:
    return text_of(tokenizer, [t for t in labels.tolist() if t != IGNORE_INDEX])


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_explicit_chat_pairs_load_from_jsonl(tmp_path):
    rows = [{"prompt": [USER], "chosen": [RIGHT], "rejected": [WRONG]}] * 3
    data = load(tmp_path, rows)
    assert data.format == "chat" and len(data.train) == len(data.validation) == 3
    assert data.train[0] == {"prompt": [USER], "chosen": [RIGHT], "rejected": [WRONG]}
    assert data.dropped_identical_train == data.dropped_identical_validation == 0


def test_chats_as_json_in_csv_cells_are_chats(tmp_path):
    import json

    rows = [{c: json.dumps(v) for c, v in (("prompt", [USER]), ("chosen", [RIGHT]), ("rejected", [WRONG]))}] * 2
    data = load(tmp_path, rows, "pairs.csv")
    assert data.format == "chat" and data.train[1]["chosen"] == [RIGHT]


def test_implicit_chat_prompt_is_the_common_leading_messages(tmp_path):
    system, follow = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sure?"}
    rows = [{"chosen": [system, USER, RIGHT, follow, RIGHT], "rejected": [system, USER, RIGHT, follow, WRONG]}] * 2
    data = load(tmp_path, rows, validation=None, validation_fraction=0.5)
    assert data.format == "chat" and len(data.train) == len(data.validation) == 1
    assert data.train[0] == {"prompt": [system, USER, RIGHT, follow], "chosen": [RIGHT], "rejected": [WRONG]}


def test_implicit_text_prompt_stops_at_a_word_start_and_leaves_the_space_to_the_completions(tmp_path):
    rows = [
        {"chosen": "Sky? It is blue.", "rejected": "Sky? It is black."},  # common "Sky? It is bl": inside a word
        {"chosen": "Q: yes", "rejected": "Q: no"},
        {"chosen": "Answer:4", "rejected": "Answer:5"},  # no space: the split is between words already
    ]
    data = load(tmp_path, rows)
    assert data.format == "text"
    assert data.train.to_list() == [
        {"prompt": "Sky? It is", "chosen": " blue.", "rejected": " black."},
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Answer:", "chosen": "4", "rejected": "5"},
    ]


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b"}, {"prompt": "Q", "chosen": " a", "rejected": " a"}]
    implicit = [
        {"chosen": [USER, RIGHT], "rejected": [USER, RIGHT]},
        {"chosen": [USER, RIGHT], "rejected": [USER, WRONG]},
    ]
    for data in (load(tmp_path, rows), load(tmp_path, implicit, "implicit.jsonl")):
        assert len(data.train) == 1 and data.dropped_identical_train == data.dropped_identical_validation == 1
    with pytest.raises(UserError, match="no preference pair left: all 1 have chosen identical"):
        load(tmp_path, rows[1:], "same.jsonl")


@pytest.mark.parametrize(
    ("rows", "values", "message"),
    [
        ([{"prompt": "Q", "good": "a", "rejected": "b"}], {}, r"no column data.chosen_column='chosen'.*prompt, good"),
        ([{"prompt": "Q", "good": "a", "bad": "b"}], {"chosen_column": "good"}, "data.rejected_column='rejected'"),
        ([{"chosen": [RIGHT], "rejected": [WRONG]}], {}, "row 1 has no prompt column.*first messages"),
        ([{"chosen": "Blue", "rejected": "Black"}], {}, "row 1 has no prompt column.*share no start"),
        ([{"prompt": "Q", "chosen": "a", "rejected": " "}], {}, "row 1: the rejected completion is empty"),
        ([{"chosen": "Q: a b", "rejected": "Q: a"}], {}, "row 1: the rejected completion is empty"),
        ([{"prompt": [USER], "chosen": [], "rejected": [WRONG]}], {}, "row 1: the chosen completion is empty"),
        ([{"prompt": [USER], "chosen": [USER, RIGHT], "rejected": [WRONG]}], {}, "starts with a 'user' message"),
        ([{"prompt": "2+2?", "chosen": [USER, RIGHT], "rejected": [USER, WRONG]}], {}, "data.prompt_column='prompt'"),
    ],
    ids=["chosen", "rejected", "chat-prefix", "text-prefix", "empty", "prefix-of", "no-message", "user", "mixed"],
)
def test_refusals_name_the_key_and_the_row(tmp_path, rows, values, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, rows * 2, **values)


def test_chat_pairs_need_a_chat_template(tmp_path):
    bare = make_tokenizer(None)
    with pytest.raises(UserError, match="data.chat_template: the tokenizer has no chat template"):
        check_preference_chat_template(dpo_config(), bare, "chat")
    check_preference_chat_template(dpo_config(), bare, "text")  # text pairs use none
    check_preference_chat_template(dpo_config(chat_template=make_tokenizer().chat_template), bare, "chat")
    assert bare.chat_template == make_tokenizer().chat_template


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


def chat_pairs() -> Dataset:
    return Dataset.from_dict({"prompt": [[USER]], "chosen": [[RIGHT]], "rejected": [[WRONG]]})


def text_pairs() -> Dataset:
    return Dataset.from_dict({"prompt": ["Q: 2+2=", "Q: 1+1="], "chosen": [" 4", " 2"], "rejected": [" 5", " 3"]})


def test_text_pairs_target_the_completion_and_eos(tokenizer):
    tokenized, report = tokenize_pairs(text_pairs(), tokenizer, dpo_config())
    row = tokenized[0]
    assert row["prompt_ids"] == tokenizer("Q: 2+2=")["input_ids"]  # with the BOS the tokenizer adds
    assert text_of(tokenizer, row["chosen_ids"]) == " 4</s>" and text_of(tokenizer, row["rejected_ids"]) == " 5</s>"
    batch = PreferenceCollator.for_tokenizer(tokenizer)(tokenized.to_list())
    assert (
        targets(tokenizer, batch["labels"][0, 0]) == " 4</s>" and targets(tokenizer, batch["labels"][0, 1]) == " 5</s>"
    )
    assert report.pairs == report.kept == 2 and report.tokens == 2 * (2 * 8 + 3 + 3)
    assert "2 pairs: 2 kept" in report.describe()


def test_chat_pairs_target_the_answer_and_end_of_turn(tokenizer):
    tokenized, _ = tokenize_pairs(chat_pairs(), tokenizer, dpo_config())
    row = tokenized[0]
    assert text_of(tokenizer, row["prompt_ids"]) == "<s><|user|>\n2+2?<|end|>\n<|assistant|>\n"
    assert (
        text_of(tokenizer, row["chosen_ids"]) == "4<|end|>\n"
        and text_of(tokenizer, row["rejected_ids"]) == "5<|end|>\n"
    )
    batch = PreferenceCollator.for_tokenizer(tokenizer)(tokenized.to_list())
    assert targets(tokenizer, batch["labels"][0, 1]) == "5<|end|>\n"


def test_a_template_whose_answer_does_not_follow_its_generation_prompt_is_refused():
    odd = make_tokenizer(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(UserError, match="data.chat_template: the pair whose prompt starts '2\\+2\\?'"):
        tokenize_pairs(chat_pairs(), odd, dpo_config())


def test_truncation_cuts_the_prompt_start_first_keeping_bos(tokenizer):
    ds = Dataset.from_dict({"prompt": ["abcdefghij"], "chosen": ["XYZ"], "rejected": ["x"]})
    tokenized, report = tokenize_pairs(ds, tokenizer, dpo_config(max_length=10, max_prompt_length=5))
    row = tokenized[0]
    assert text_of(tokenizer, row["prompt_ids"]) == "<s>ghij"  # the end, next to the answer
    assert text_of(tokenizer, row["chosen_ids"]) == "XYZ</s>"  # 5 + 4 fits: untouched
    assert (report.prompts_truncated, report.completions_truncated) == (1, 0)
    tokenized, report = tokenize_pairs(ds, tokenizer, dpo_config(max_length=7, max_prompt_length=5))
    assert text_of(tokenizer, tokenized[0]["chosen_ids"]) == "XY" and report.completions_truncated == 1


def test_pairs_identical_once_cut_are_dropped_and_counted(tokenizer):
    ds = Dataset.from_dict({"prompt": ["P", "P"], "chosen": ["same-a", "x"], "rejected": ["same-b", "y"]})
    tokenized, report = tokenize_pairs(ds, tokenizer, dpo_config(max_length=5))
    assert len(tokenized) == report.kept == 1 and report.dropped_identical == 1
    assert tokenized[0]["chosen_ids"] != tokenized[0]["rejected_ids"]
    with pytest.raises(UserError, match="no preference pair left after tokenizing"):
        tokenize_pairs(ds.select([0]), tokenizer, dpo_config(max_length=5))


def test_generation_prompts_are_tokenized_as_in_training(tokenizer):
    for ds, reference in ((chat_pairs(), "4"), (text_pairs(), " 4")):
        tokenized, _ = tokenize_pairs(ds, tokenizer, dpo_config())
        prompts = preference_generation_prompts(ds, tokenizer, 5)
        assert len(prompts) == len(ds) and prompts[0]["reference"] == reference
        assert prompts[0]["prompt_ids"] == tokenized[0]["prompt_ids"]


def test_describe_pairs_gives_the_longest_sequence(tokenizer):
    tokenized, report = tokenize_pairs(text_pairs(), tokenizer, dpo_config())
    lines, longest = describe_pairs(tokenized, report, tokenized, report)
    assert longest == 8 + 3 and lines[0].startswith("train: 2 pairs") and "sequences: token lengths" in lines[1]


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------

EXAMPLES = [
    {"prompt_ids": [1, 10, 11], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2], "ref_logps": [-1.0, -2.0]},
    {"prompt_ids": [1, 12], "chosen_ids": [22, 2], "rejected_ids": [31, 32, 33, 2], "ref_logps": [-3.0, -4.0]},
]


def test_padded_batch_shapes_and_labels():
    batch = PreferenceCollator(pad_token_id=0)(EXAMPLES)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 2, 6)
    assert batch["input_ids"][0, 1].tolist() == [1, 10, 11, 30, 2, 0]
    assert batch["labels"][0, 1].tolist() == [-100, -100, -100, 30, 2, -100]
    assert batch["labels"][1, 1].tolist() == [-100, -100, 31, 32, 33, 2]
    assert batch["attention_mask"][1, 0].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].tolist() == [[-1, -2], [-3, -4]]
    assert pairs_in(batch).item() == 2 and pairs_in(batch).dim() == 0
    assert "ref_logps" not in PreferenceCollator(0)(
        [{k: v for k, v in e.items() if k != "ref_logps"} for e in EXAMPLES]
    )
    with pytest.raises(ValueError, match="ref_logps"):
        PreferenceCollator(0)([EXAMPLES[0], {k: v for k, v in EXAMPLES[1].items() if k != "ref_logps"}])


def test_padding_free_batch_holds_the_padded_tokens_in_one_row():
    padded = PreferenceCollator(pad_token_id=0)(EXAMPLES)
    flat = PreferenceCollator(pad_token_id=0, padding_free=True)(EXAMPLES)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, 6 + 5 + 4 + 6)
    assert flat["position_ids"][0].tolist() == [*range(6), *range(5), *range(4), *range(6)]
    assert flat["sequence_ids"][0].tolist() == [0] * 6 + [1] * 5 + [2] * 4 + [3] * 6
    real = padded["attention_mask"].bool()
    assert flat["input_ids"][0].tolist() == padded["input_ids"][real].tolist()
    assert flat["labels"][0].tolist() == padded["labels"][real].tolist()
    assert torch.equal(flat["ref_logps"], padded["ref_logps"]) and pairs_in(flat).item() == 2
