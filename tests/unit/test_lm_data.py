"""SFT data: reading and normalising, loss masks of chats and prompt/completion pairs, truncation, packing,
collation, generation prompts. A character-level tokenizer (helpers.make_tokenizer) makes every token a readable
character."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch
from datasets import Dataset
from helpers import CHAT_TEMPLATE, make_tokenizer, tiny_llama_config, write_rows
from transformers import PreTrainedTokenizerFast

from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.schemas import SFTDataConfig
from finetune.lm.collate import SFTCollator
from finetune.lm.data import check_chat_template, load_sft_data
from finetune.lm.packing import best_fit_decreasing, pack_examples
from finetune.lm.tokenize import generation_prompts, tokenize_sft
from finetune.training.accumulation import IGNORE_INDEX, count_next_token_terms, summed_next_token_loss

# helpers.CHAT_TEMPLATE's rendering, with the assistant output marked as TRL's training templates do.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def sft_config(**values) -> SFTDataConfig:
    return build_config(SFTDataConfig, [("test", values)])


def text_of(tokenizer, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(list(ids)))


def target_runs(tokenizer, labels: list[int]) -> list[str]:
    """The text of each run of consecutive target tokens."""
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(text_of(tokenizer, current))
            current = []
    return runs


def loss_terms(labels) -> int:
    return int(count_next_token_terms({"labels": torch.as_tensor(labels)}))


# --------------------------------------------------------------------------------------------
# Loss masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GENERATION_TEMPLATE], ids=["prefixes", "generation-tags"])
def test_chat_targets_are_assistant_turns_with_their_end_of_turn(template):
    tokenizer = make_tokenizer(template)
    second = [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bob"}]
    ds = Dataset.from_dict({"messages": [CHAT, second]})
    tokenized, report = tokenize_sft(ds, tokenizer, sft_config(max_length=200))
    ids, labels = tokenized["input_ids"][0], tokenized["labels"][0]
    assert len(ids) == len(labels)
    assert text_of(tokenizer, ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # not added twice
    # Content and end-of-turn (what the model must generate, and stop with); never the role header or user turns.
    assert target_runs(tokenizer, labels) == ["Hello.<|end|>\n", "4<|end|>\n"]
    assert target_runs(tokenizer, tokenized["labels"][1]) == ["Bob<|end|>\n"]
    assert report.examples == report.kept == 2
    assert report.target_tokens == loss_terms(labels) + loss_terms(tokenized["labels"][1]) == 8 + 3 + 5
    assert report.tokens == sum(len(x) for x in tokenized["input_ids"])


def test_train_on_prompt_makes_every_token_a_target(tokenizer):
    chats = Dataset.from_dict({"messages": [CHAT]})
    pairs = Dataset.from_dict({"prompt": ["Q: 1+1=", "x"], "completion": [" 2", "y"]})
    for ds in (chats, pairs):
        tokenized, _ = tokenize_sft(ds, tokenizer, sft_config(train_on_prompt=True))
        for ids, labels in zip(tokenized["input_ids"], tokenized["labels"], strict=True):
            assert labels == ids


def test_prompt_completion_boundary_bos_and_eos(tokenizer):
    ds = Dataset.from_dict({"prompt": ["Q: 2+2="], "completion": [" 4"]})
    tokenized, report = tokenize_sft(ds, tokenizer, sft_config())
    ids, labels = tokenized["input_ids"][0], tokenized["labels"][0]
    prompt_ids = tokenizer("Q: 2+2=")["input_ids"]  # with the BOS the tokenizer adds
    assert ids == prompt_ids + tokenizer(" 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    assert target_runs(tokenizer, labels) == [" 4</s>"]
    assert report.target_tokens == 3


def test_text_is_all_targets_with_eos(tokenizer):
    ds = Dataset.from_dict({"text": ["abc"]})
    tokenized, report = tokenize_sft(ds, tokenizer, sft_config())
    assert text_of(tokenizer, tokenized["input_ids"][0]) == "<s>abc</s>"
    assert tokenized["labels"][0] == tokenized["input_ids"][0]
    assert report.target_tokens == 4


def test_truncate_or_drop_long_examples_and_drop_those_without_targets(tokenizer):
    prompts = ["ab", "aaa", "abcdefghi", "abcdefghijkl"]
    completions = ["cd", "b" * 15, "x", "y"]  # 6, 20, 12 and 15 tokens with BOS and EOS
    ds = Dataset.from_dict({"prompt": prompts, "completion": completions})
    cut, report = tokenize_sft(ds, tokenizer, sft_config(max_length=10))
    # Kept: the short one, and the 20 tokens cut to 10. The last two: only prompt tokens within the first 10.
    assert [len(x) for x in cut["input_ids"]] == [6, 10]
    assert [target_runs(tokenizer, labels) for labels in cut["labels"]] == [["cd</s>"], ["bbbbbb"]]
    assert (report.examples, report.truncated, report.dropped_too_long, report.dropped_no_targets) == (4, 1, 0, 2)
    assert report.kept == 2 and report.target_tokens == 3 + 6
    dropped, report = tokenize_sft(ds, tokenizer, sft_config(max_length=10, too_long="drop"))
    assert [len(x) for x in dropped["input_ids"]] == [6]
    assert (report.truncated, report.dropped_too_long, report.dropped_no_targets, report.kept) == (0, 3, 0, 1)
    assert report.describe() == (
        "4 examples: 1 kept (0 truncated to 10 tokens), 3 dropped as too long, 0 dropped with no target token; "
        "6 tokens, 3 of them targets (50%)"
    )


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_formats_are_detected_in_every_file_type(tmp_path, suffix):
    pairs = [{"prompt": f"p{i}", "completion": f"c{i}", "extra": i} for i in range(20)]
    data = load_sft_data(sft_config(train=str(write_rows(tmp_path / f"pc{suffix}", pairs)), validation_fraction=0.25))
    assert data.format == "prompt_completion" and data.train.column_names == ["prompt", "completion"]
    assert (len(data.train), len(data.validation)) == (15, 5)
    assert sorted([*data.train["prompt"], *data.validation["prompt"]]) == sorted(r["prompt"] for r in pairs)

    texts = [{"body": f"text {i}"} for i in range(10)] + [{"body": ""}]
    path = write_rows(tmp_path / f"text{suffix}", texts)
    data = load_sft_data(sft_config(train=str(path), text_column="body", validation=str(path)))
    assert data.format == "text" and data.validation["text"] == [r["body"] for r in texts[:10]]  # empty row dropped

    chats = [{"conv": CHAT, "id": 0}, {"conv": CHAT[:3], "id": 1}, {"conv": [], "id": 2}]
    if suffix == ".csv":  # a CSV cell holds a chat as JSON text
        chats = [{**row, "conv": json.dumps(row["conv"])} for row in chats]
    path = write_rows(tmp_path / f"chat{suffix}", chats)
    data = load_sft_data(sft_config(train=str(path), validation=str(path), messages_column="conv"))
    assert data.format == "chat" and data.validation.column_names == ["messages"]
    assert data.validation["messages"] == [CHAT, CHAT[:3]]


def test_prompt_template_builds_prompts_from_instruction_input_output(tmp_path, tokenizer):
    rows = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi", "input": None, "output": "hi"},
        {"instruction": "Nothing to learn", "input": "x", "output": ""},
    ]
    path = write_rows(tmp_path / "alpaca.jsonl", rows)
    cfg = sft_config(
        train=str(path),
        validation=str(path),
        prompt_template="### {instruction}\n{input}\n### Answer: ",
        completion_column="output",
    )
    data = load_sft_data(cfg)
    assert data.format == "prompt_completion"
    assert data.validation["prompt"] == ["### Add\n1 and 2\n### Answer: ", "### Say hi\n\n### Answer: "]
    assert data.validation["completion"] == ["3", "hi"]  # the row with an empty output is dropped
    tokenized, _ = tokenize_sft(data.validation, tokenizer, cfg)
    assert [target_runs(tokenizer, labels) for labels in tokenized["labels"]] == [["3</s>"], ["hi</s>"]]


def test_missing_columns_and_bad_rows_name_the_key(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(UserError) as err:
        load_sft_data(sft_config(train=str(path)))
    for part in ("cannot tell the data format", "data.messages_column='messages'", "the columns are: question, answer"):
        assert part in str(err.value)
    with pytest.raises(UserError, match=r"format prompt_completion needs column data.prompt_column='prompt'"):
        load_sft_data(sft_config(train=str(path), completion_column="answer"))
    with pytest.raises(UserError, match=r"format text needs column data.text_column='text'"):
        load_sft_data(sft_config(train=str(path), format="text"))
    with pytest.raises(UserError, match=r"data.prompt_template reads \{context\}, but there is no such column"):
        load_sft_data(sft_config(train=str(path), completion_column="answer", prompt_template="{question} {context}"))
    with pytest.raises(UserError, match="data.prompt_template='{}': name each field after a column"):
        load_sft_data(sft_config(train=str(path), completion_column="answer", prompt_template="{}"))

    bad = write_rows(tmp_path / "chat.jsonl", [{"messages": ["hi"]}] * 2)
    with pytest.raises(UserError, match=r"row 1 of column data.messages_column='messages' holds 'hi', not a"):
        load_sft_data(sft_config(train=str(bad)))
    text = write_rows(tmp_path / "chat.csv", [{"messages": "hi", "id": 1}] * 2)
    with pytest.raises(UserError, match=r"row 1 of column .* is text that is not a JSON list of messages: 'hi'"):
        load_sft_data(sft_config(train=str(text)))
    empty = write_rows(tmp_path / "empty.jsonl", [{"text": " "}, {"text": None}])
    with pytest.raises(UserError, match=r"no examples left after dropping rows with empty content \(2 rows read\)"):
        load_sft_data(sft_config(train=str(empty)))


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


def test_chat_template_inline_from_a_file_or_missing(tmp_path):
    bare = make_tokenizer(chat_template=None)
    check_chat_template(sft_config(), bare, "prompt_completion")  # only chats need one
    with pytest.raises(UserError, match="data.chat_template: the tokenizer has no chat template"):
        check_chat_template(sft_config(), bare, "chat")
    check_chat_template(sft_config(chat_template=CHAT_TEMPLATE), bare, "chat")
    assert bare.chat_template == CHAT_TEMPLATE
    file = tmp_path / "chatml.jinja"
    file.write_text(GENERATION_TEMPLATE)
    check_chat_template(sft_config(chat_template=str(file)), bare, "chat")
    assert bare.chat_template == GENERATION_TEMPLATE
    with pytest.raises(UserError, match="data.chat_template='nope.jinja' is neither a Jinja template"):
        check_chat_template(sft_config(chat_template="nope.jinja"), bare, "chat")
    with pytest.raises(UserError, match="data.chat_template: rendering a user/assistant chat failed"):
        check_chat_template(sft_config(chat_template="{% for m in messages %}{{ m.content }"), bare, "chat")
    with pytest.raises(UserError, match="does not render the messages' content"):
        check_chat_template(sft_config(chat_template="{{ bos_token }}"), bare, "chat")


def test_template_that_renders_the_last_turn_differently():
    # Like Qwen3: an empty think block on the last assistant turn only. Earlier turns are found by their text.
    template = CHAT_TEMPLATE.replace(
        "\n{{ m['content'] }}", "\n{% if m['role'] == 'assistant' and loop.last %}<think/>{% endif %}{{ m['content'] }}"
    )
    tokenizer = make_tokenizer(template)
    tricky = [*CHAT[:3], {"role": "user", "content": "Say Hello.<|end|>\n"}, {"role": "assistant", "content": "Hello."}]
    tokenized, _ = tokenize_sft(Dataset.from_dict({"messages": [CHAT, tricky]}), tokenizer, sft_config())
    assert target_runs(tokenizer, tokenized["labels"][0]) == ["Hello.<|end|>\n", "<think/>4<|end|>\n"]
    assert target_runs(tokenizer, tokenized["labels"][1]) == ["Hello.<|end|>\n", "<think/>Hello.<|end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused():
    # Drops the content of every assistant turn but the last (as some templates drop earlier reasoning).
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tokenizer = make_tokenizer(template)
    ds = Dataset.from_dict({"messages": [CHAT]})
    with pytest.raises(UserError, match=r"in the chat that starts 'Be brief.', assistant message 3 cannot be located"):
        tokenize_sft(ds, tokenizer, sft_config())
    tokenized, _ = tokenize_sft(ds, tokenizer, sft_config(train_on_prompt=True))  # no spans needed
    assert len(tokenized) == 1


def test_generation_prompts_match_the_training_tokens(tokenizer):
    chats = Dataset.from_dict({"messages": [CHAT, [{"role": "user", "content": "no answer"}], CHAT[:3]]})
    prompts = generation_prompts(chats, tokenizer, n=5)
    assert [p["reference"] for p in prompts] == ["4", "Hello."]
    assert prompts[0]["prompt"].endswith("<|user|>\n2+2?<|end|>\n<|assistant|>\n")
    tokenized, _ = tokenize_sft(chats, tokenizer, sft_config())
    ids = tokenized["input_ids"][0]
    assert ids[: len(prompts[0]["prompt_ids"])] == prompts[0]["prompt_ids"]
    assert text_of(tokenizer, ids[len(prompts[0]["prompt_ids"]) :]) == "4<|end|>\n"

    pairs = Dataset.from_dict({"prompt": ["Q: a?", "Q: b?"], "completion": [" A", " B"]})
    prompts = generation_prompts(pairs, tokenizer, n=1)
    tokenized, _ = tokenize_sft(pairs, tokenizer, sft_config())
    assert len(prompts) == 1 and prompts[0]["reference"] == " A"
    assert tokenized["input_ids"][0][: len(prompts[0]["prompt_ids"])] == prompts[0]["prompt_ids"]
    assert generation_prompts(Dataset.from_dict({"text": ["x"]}), tokenizer, n=3) == []


# --------------------------------------------------------------------------------------------
# Packing and collation
# --------------------------------------------------------------------------------------------


def random_examples(n: int, seed: int, longest: int = 40) -> Dataset:
    """Tokenized examples of random lengths whose labels mask a random prompt."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length, prompt = rng.randint(2, longest), rng.randint(0, 5)
        x = [rng.randrange(10, 100) for _ in range(length)]
        ids.append(x)
        labels.append([IGNORE_INDEX] * min(prompt, length) + x[prompt:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def split_packed_row(row: dict) -> list[tuple[tuple, tuple]]:
    """(input ids, labels) of each example of a packed row, cut where the position ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])) for a, b in zip(starts, starts[1:], strict=False)]


def test_packing_keeps_every_example_whole_and_the_loss_terms():
    examples = random_examples(200, seed=1)
    packed = pack_examples(examples, max_length=64)
    assert packed.column_names == ["input_ids", "labels", "position_ids", "num_examples"]
    rows = packed.to_list()
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 64 for r in rows)
    pieces = [piece for r in rows for piece in split_packed_row(r)]
    assert [len(split_packed_row(r)) for r in rows] == packed["num_examples"]
    # Every example once, whole; only its first label changed, to -100.
    original = sorted((tuple(e["input_ids"]), (IGNORE_INDEX, *e["labels"][1:])) for e in examples)
    assert sorted(pieces) == original
    for r in rows:
        assert all(r["labels"][i] == IGNORE_INDEX for i, p in enumerate(r["position_ids"]) if p == 0)
        assert r["position_ids"] == [p for ids, _ in split_packed_row(r) for p in range(len(ids))]
        # A packed row's loss terms are those of its examples unpacked.
        assert loss_terms(r["labels"]) == sum(loss_terms(list(labels)) for _, labels in split_packed_row(r))
    assert sum(loss_terms(r["labels"]) for r in rows) == sum(loss_terms(e) for e in examples["labels"])
    # Tight and deterministic: within a row of the optimum, the same rows every time.
    total = sum(len(x) for x in examples["input_ids"])
    assert len(rows) <= -(-total // 64) + 1
    assert pack_examples(examples, max_length=64).to_list() == rows
    shuffled = pack_examples(examples, max_length=64, seed=3).to_list()
    assert sorted(piece for r in shuffled for piece in split_packed_row(r)) == original


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
    import numpy as np

    assert best_fit_decreasing(np.array([3, 5, 2, 4, 6]), capacity=8) == [[4, 2], [1, 0], [3]]
    assert best_fit_decreasing(np.array([8, 8]), capacity=8) == [[0], [1]]


def test_packing_after_tokenizing_a_selection(tokenizer):
    ds = Dataset.from_dict({"prompt": ["ab", "a" * 30, "c"], "completion": ["x", "y", "zz"]})
    tokenized, _ = tokenize_sft(ds, tokenizer, sft_config(max_length=12, too_long="drop"))  # an indices mapping
    assert [len(x) for x in tokenized["input_ids"]] == [5, 5]
    packed = pack_examples(tokenized.select([1, 0]), max_length=12)
    assert packed["num_examples"] == [2]
    assert packed["input_ids"] == [tokenized["input_ids"][1] + tokenized["input_ids"][0]]


def test_collator_pads_unpacked_rows_with_an_attention_mask():
    collate = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert "position_ids" not in batch
    assert pickle.loads(pickle.dumps(collate)) == collate  # DataLoader workers


def test_collator_gives_packed_rows_position_ids_and_no_attention_mask(tokenizer):
    packed = pack_examples(random_examples(30, seed=2, longest=12), max_length=16)
    rows = packed.to_list()[:3]
    batch = SFTCollator.for_tokenizer(tokenizer, pad_to_multiple_of=8)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(r["input_ids"]) for r in rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["position_ids"][i].tolist() == r["position_ids"] + list(range(width - n))
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all() and batch["labels"][i, n:].eq(-100).all()
    assert int(count_next_token_terms(batch)) == sum(loss_terms(r["labels"]) for r in rows)

    flat = SFTCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert int(count_next_token_terms(flat)) == int(count_next_token_terms(batch))
    unpacked = SFTCollator(pad_token_id=0, flatten=True)([{"input_ids": [5, 6], "labels": [5, 6]}] * 2)
    assert unpacked["position_ids"].tolist() == [[0, 1, 0, 1]] and unpacked["labels"].tolist() == [[-100, 6, -100, 6]]
    with pytest.raises(ValueError, match="mixes packed rows"):
        SFTCollator(pad_token_id=0)([rows[0], {"input_ids": [1], "labels": [1]}])


def test_packed_batch_gives_the_loss_of_the_separate_examples():
    """With position_ids, no attention_mask and use_cache=False, transformers attends within each example."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=100)).eval()
    examples = random_examples(12, seed=5, longest=20)
    collate = SFTCollator(pad_token_id=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (10x slower on a busy machine)
    try:
        with torch.no_grad():
            separate = sum(
                summed_next_token_loss(model(**collate([e]), use_cache=False).logits, torch.tensor([e["labels"]]))
                for e in examples.to_list()
            )
            batch = collate(pack_examples(examples, max_length=48).to_list())
            packed = summed_next_token_loss(model(**batch, use_cache=False).logits, batch["labels"])
    finally:
        torch.set_num_threads(threads)
    assert batch["input_ids"].shape[0] < len(examples)  # rows of several examples
    assert torch.allclose(packed, separate, rtol=1e-5)
