"""Data of the DPO recipe, before tokenizing: read preference pairs (data.train, data.validation or a held-out
data.validation_fraction) in TRL's formats and normalise them to columns `prompt`, `chosen`, `rejected`.

A pair has an explicit prompt (data.prompt_column) or an implicit one: the common start of chosen and rejected,
which then hold whole texts or conversations. Format `text`: the three are strings; format `chat`: lists of
{role, content} messages, chosen and rejected holding the completion only (it starts with an assistant message).
Pairs whose chosen and rejected are the same teach nothing: they are dropped and counted. Empty completions and
prompts that cannot be found are refused, naming the row. `finetune.preference.tokenize` makes token ids of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from finetune.core.data import read_source, read_validation, split_validation
from finetune.core.errors import UserError
from finetune.core.schemas import DPODataConfig
from finetune.lm.data import _as_text, _chat_problem, check_chat_template

COLUMNS = ["prompt", "chosen", "rejected"]
MESSAGES = List({"role": Value("string"), "content": Value("string")})
# Declared, so that a batch whose prompts are all empty chats is not typed list<null> and refused by the next.
FEATURES = {
    "text": Features({c: Value("string") for c in COLUMNS}),
    "chat": Features({c: MESSAGES for c in COLUMNS}),
}
NO_CHAT_TEMPLATE = (
    "data.chat_template: the tokenizer has no chat template, and chat pairs are rendered through one. Set "
    "data.chat_template to a Jinja template or a .jinja file (a base model has none: pick the template you want it "
    "to learn), or give the pairs as text."
)


@dataclass
class PreferenceData:
    """Train and validation pairs in one format, and how many pairs of each were dropped as identical (with a
    carved validation split, the training file's drops all count as train's)."""

    train: Dataset
    validation: Dataset
    format: str  # "text" or "chat"
    dropped_identical_train: int = 0
    dropped_identical_validation: int = 0


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def _json_chat(value: Any) -> list | None:
    """A cell's chat: a list, or a JSON list of messages in a text cell (CSV); None for text."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        if isinstance(parsed, list) and parsed and _chat_problem(parsed) is None:
            return parsed
    return None


def _cell_format(value: Any) -> str | None:
    """chat or text; None for an empty cell (null, NaN), which fits either."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return "chat" if _json_chat(value) is not None else "text"


def _messages(value: Any, row: int, column: str, cfg: DPODataConfig, key: str) -> list[dict[str, str]]:
    """A chat cell as [{role, content}] (extra message fields such as tool_calls are dropped)."""
    chat = _json_chat(value) or []
    problem = _chat_problem(chat)
    if problem:
        raise UserError(
            f"{key}: row {row + 1} of column {_column_key(column, cfg)} {problem}. A chat is a list of "
            '{"role": ..., "content": "..."} messages (text content only).'
        )
    return [{"role": m["role"], "content": _as_text(m["content"])} for m in chat]


def _column_key(column: str, cfg: DPODataConfig) -> str:
    name = {cfg.prompt_column: "prompt", cfg.chosen_column: "chosen", cfg.rejected_column: "rejected"}[column]
    return f"data.{name}_column={column!r}"


def _mixed(fmt: str, column: str, row: int, cfg: DPODataConfig, key: str) -> UserError:
    other = "text" if fmt == "chat" else "a chat"
    hint = ""
    if fmt == "chat" and column == cfg.prompt_column:  # e.g. HuggingFaceH4/ultrafeedback_binarized
        hint = (
            " If chosen and rejected hold the whole conversation, set data.prompt_column to a name the data does "
            "not have: the prompt is then their common start."
        )
    return UserError(
        f"{key}: row {row + 1} of column {_column_key(column, cfg)} holds {other}, while the pairs are {fmt} "
        f"(told by the first pair's chosen). Give prompt, chosen and rejected all as text or all as lists of chat "
        f"messages.{hint}"
    )


# --------------------------------------------------------------------------------------------
# Prompts and completions
# --------------------------------------------------------------------------------------------


def _no_prompt(row: int, key: str, what: str) -> UserError:
    return UserError(
        f"{key}: row {row + 1} has no prompt column and {what}, so no prompt can be taken from their common start. "
        "Add a prompt column (data.prompt_column) holding the prompt, with chosen and rejected holding only the "
        "completions."
    )


def _split_text(chosen: str, rejected: str, row: int, key: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of whole texts: the prompt is their common start, cut back to the start of a word
    it would split (a completion starts with a whole word), and a space before that word goes to the
    completions, as TRL's `extract_prompt` does (tokenizers glue a word's leading space to it: " blue")."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut and chosen[cut - 1].isalnum() and (chosen[cut : cut + 1].isalnum() or rejected[cut : cut + 1].isalnum()):
        while cut and chosen[cut - 1].isalnum():
            cut -= 1
    if cut and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise _no_prompt(row, key, "its chosen and rejected texts share no start")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_chat(chosen: list, rejected: list, row: int, key: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) of whole conversations: the prompt is their longest run of identical leading
    messages."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise _no_prompt(row, key, "the first messages of its chosen and rejected conversations differ")
    return chosen[:n], chosen[n:], rejected[n:]


def _check_completion(completion: str | list, which: str, row: int, key: str) -> None:
    if isinstance(completion, str):
        empty = not completion.strip()
    else:
        empty = not any(m["content"].strip() for m in completion)
    if empty:
        raise UserError(
            f"{key}: row {row + 1}: the {which} completion is empty (after its prompt). Every pair needs a chosen "
            "and a rejected completion: fix or remove the row."
        )
    if not isinstance(completion, str) and completion[0]["role"] != "assistant":
        raise UserError(
            f"{key}: row {row + 1}: the {which} completion starts with a {completion[0]['role']!r} message, not an "
            "assistant one. The completion is what the model answers: with a prompt column, chosen and rejected "
            'hold only the answer, e.g. [{"role": "assistant", "content": ...}].'
        )


# --------------------------------------------------------------------------------------------
# Reading and normalising
# --------------------------------------------------------------------------------------------


def _check_columns(columns: list[str], cfg: DPODataConfig, key: str) -> None:
    needed = {"data.chosen_column": cfg.chosen_column, "data.rejected_column": cfg.rejected_column}
    missing = [f"{k}={v!r}" for k, v in needed.items() if v not in columns]
    if missing:
        raise UserError(
            f"{key}: no column {' or '.join(missing)}; the columns are: {', '.join(columns)}. Set "
            "data.chosen_column and data.rejected_column to the names your data uses."
        )


def detect_format(ds: Dataset, cfg: DPODataConfig) -> str:
    """chat or text: what the first pair with a chosen value holds."""
    for value in ds.select_columns([cfg.chosen_column]):
        fmt = _cell_format(value[cfg.chosen_column])
        if fmt:
            return fmt
    return "text"


def _normaliser(fmt: str, cfg: DPODataConfig, key: str, explicit: bool):
    """A batched map function: rows -> rows of COLUMNS in `fmt`, pairs with chosen == rejected left out."""
    columns = [cfg.prompt_column] * explicit + [cfg.chosen_column, cfg.rejected_column]

    def cell(batch: dict, column: str, i: int, row: int):
        value = batch[column][i]
        if _cell_format(value) not in (fmt, None):
            raise _mixed(fmt, column, row, cfg, key)
        return _messages(value, row, column, cfg, key) if fmt == "chat" else _as_text(value)

    def normalise_batch(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {c: [] for c in COLUMNS}
        for i, row in enumerate(indices):
            values = [cell(batch, column, i, row) for column in columns]
            if explicit:
                prompt, chosen, rejected = values
                for which, completion in (("chosen", chosen), ("rejected", rejected)):
                    _check_completion(completion, which, row, key)
                if chosen == rejected:
                    continue
            else:
                if values[0] == values[1]:  # before splitting, which would leave two empty completions
                    continue
                split = _split_chat if fmt == "chat" else _split_text
                prompt, chosen, rejected = split(*values, row, key)
                for which, completion in (("chosen", chosen), ("rejected", rejected)):
                    _check_completion(completion, which, row, key)
            for name, value in zip(COLUMNS, (prompt, chosen, rejected), strict=True):
                out[name].append(value)
        return out

    return normalise_batch


def normalise_pairs(ds: Dataset, cfg: DPODataConfig, key: str, fmt: str | None = None) -> tuple[Dataset, str, int]:
    """(pairs in COLUMNS, their format, how many were dropped as identical); `fmt` = the format they must have."""
    _check_columns(ds.column_names, cfg, key)
    found = detect_format(ds, cfg)
    if fmt and found != fmt:
        raise UserError(f"{key}: the pairs are {found}, but data.train's are {fmt}: give both in one format.")
    explicit = cfg.prompt_column in ds.column_names
    out = ds.map(
        _normaliser(found, cfg, key, explicit),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=FEATURES[found],
        keep_in_memory=True,
        desc="Reading pairs",
    )
    if len(out) == 0:
        why = f"all {len(ds):,} have chosen identical to rejected" if len(ds) else "the data has no rows"
        raise UserError(f"{key}: no preference pair left: {why}. Give pairs whose chosen and rejected differ.")
    return out, found, len(ds) - len(out)


def load_preference_data(cfg: DPODataConfig) -> PreferenceData:
    """Read train and validation as `cfg` says and normalise both to COLUMNS in one format.

    Validation is data.validation (a file, or a split of data.train's Hub dataset), or else a random
    data.validation_fraction of the (kept) training pairs drawn with data.split_seed.
    """
    train_key = f"data.train ({cfg.train})"
    train = read_source(cfg.train, "data.train", cfg.hub_config, cfg.train_split)
    train, fmt, dropped_train = normalise_pairs(train, cfg, train_key)
    dropped_validation = 0
    if cfg.validation is None:
        train, validation = split_validation(train, cfg)
    else:
        key = f"data.validation ({cfg.validation})"
        validation, _, dropped_validation = normalise_pairs(read_validation(cfg), cfg, key, fmt)
    return PreferenceData(train, validation, fmt, dropped_train, dropped_validation)


def pairs_format(ds: Dataset) -> str:
    """The format of pairs that `load_preference_data` normalised: chat when the prompts are lists of messages."""
    if not all(c in ds.column_names for c in COLUMNS):
        raise ValueError(f"not normalised preference pairs: columns {ds.column_names}")
    return "chat" if isinstance(ds.features["prompt"], List) else "text"


def check_preference_chat_template(cfg: DPODataConfig, tokenizer: PreTrainedTokenizerBase, format: str) -> None:
    """For chat pairs: install data.chat_template on `tokenizer` (if set) and check that a usable template exists,
    before the model loads. Text pairs use no template: nothing is checked or changed."""
    if format != "chat":
        return
    if not cfg.chat_template and not tokenizer.chat_template:
        raise UserError(NO_CHAT_TEMPLATE)
    check_chat_template(cfg, tokenizer, format)
