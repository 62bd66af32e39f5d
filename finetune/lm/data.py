"""Data of the causal-LM SFT recipe, before tokenizing: read chats, prompt/completion pairs or plain text
(data.train, data.validation or a held-out data.validation_fraction), decide data.format, normalise every format
to its columns (`FORMAT_COLUMNS`, empty rows dropped); install and check the chat template chats are rendered
through. `finetune.lm.tokenize` turns the result into token ids with a loss mask.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.core.data import read_source, read_validation, split_validation
from finetune.core.errors import UserError, first_line
from finetune.core.paths import local_path
from finetune.core.schemas import SFTDataConfig

# Columns of each format after `load_sft_data`.
FORMAT_COLUMNS = {"chat": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}
# A template that marks assistant output itself (TRL's convention, read by `return_assistant_tokens_mask`).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# --------------------------------------------------------------------------------------------
# Reading and normalising
# --------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    """Train and validation examples in one format: column `messages` (chat: lists of {role, content}),
    columns `prompt`, `completion` (prompt_completion), or column `text`."""

    train: Dataset
    validation: Dataset
    format: str


def resolve_format(columns: list[str], cfg: SFTDataConfig, key: str) -> str:
    """data.format, with `auto` decided by which configured column the data has."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_column in columns:
        return "chat"
    if cfg.completion_column in columns:
        return "prompt_completion"
    if cfg.text_column in columns:
        return "text"
    raise UserError(
        f"{key}: cannot tell the data format: found none of the columns data.messages_column="
        f"{cfg.messages_column!r} (chat), data.completion_column={cfg.completion_column!r} (prompt_completion) or "
        f"data.text_column={cfg.text_column!r} (text); the columns are: {', '.join(columns)}. Set data.format and "
        "the column key to the names your data uses."
    )


def template_fields(template: str) -> list[str]:
    """The column names a `str.format` prompt template reads, e.g. ['instruction', 'input']."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(
            f"data.prompt_template={template!r} is not a valid format string ({err}); "
            "write literal braces as {{ }}."
        ) from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise UserError(
                f"data.prompt_template={template!r}: name each field after a column, e.g. {{instruction}}; "
                "write literal braces as {{ }}."
            )
        fields.append(base)
    return list(dict.fromkeys(fields))


def _check_columns(columns: list[str], fmt: str, cfg: SFTDataConfig, key: str) -> None:
    needed = {
        "chat": {"data.messages_column": cfg.messages_column},
        "prompt_completion": {"data.completion_column": cfg.completion_column}
        | ({} if cfg.prompt_template else {"data.prompt_column": cfg.prompt_column}),
        "text": {"data.text_column": cfg.text_column},
    }[fmt]
    missing = [f"{k}={v!r}" for k, v in needed.items() if v not in columns]
    if missing:
        raise UserError(
            f"{key}: format {fmt} needs column {' and '.join(missing)}, which is not there; the columns are: "
            f"{', '.join(columns)}. Set the column keys (or data.format) to match your data."
        )
    if fmt == "prompt_completion" and cfg.prompt_template:
        absent = [f for f in template_fields(cfg.prompt_template) if f not in columns]
        if absent:
            raise UserError(
                f"{key}: data.prompt_template reads {', '.join('{' + f + '}' for f in absent)}, but there is no such "
                f"column; the columns are: {', '.join(columns)}."
            )


def _as_text(value: Any) -> str:
    """A cell as text: None and NaN are empty; numbers (as CSV columns of digits are read) become strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _chat_problem(value: Any) -> str | None:
    """What keeps a (JSON-decoded) chat cell from being a list of {role, content} messages, if anything."""
    if not isinstance(value, list):
        return f"is a {type(value).__name__}, not a list of messages"
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"holds {str(message)[:80]!r}, not a {{role, content}} message"
        if not isinstance(message["role"], str) or not isinstance(message["content"], (str, type(None))):
            return f"holds a message whose role or content is not a string: {str(message)[:80]!r}"
    return None


def _as_messages(value: Any, row: int, column: str, key: str) -> list[dict[str, str]]:
    """A chat cell as [{role, content}] (extra message fields such as tool_calls are dropped)."""
    if value is None:
        return []
    try:
        value = json.loads(value) if isinstance(value, str) else value  # a CSV cell holds a chat as JSON
        problem = _chat_problem(value)
    except json.JSONDecodeError:
        problem = f"is text that is not a JSON list of messages: {value[:80]!r}"
    if problem:
        raise UserError(
            f"{key}: row {row + 1} of column data.messages_column={column!r} {problem}. A chat is a list of "
            '{"role": ..., "content": "..."} messages (text content only).'
        )
    return [{"role": m["role"], "content": _as_text(m["content"])} for m in value]


def _normaliser(fmt: str, cfg: SFTDataConfig, key: str):
    """A batched map function: rows of the input columns -> rows of FORMAT_COLUMNS[fmt], empty rows left out."""
    fields = template_fields(cfg.prompt_template) if fmt == "prompt_completion" and cfg.prompt_template else []

    def chat(batch: dict, indices: list[int]) -> dict:
        chats = [
            _as_messages(v, i, cfg.messages_column, key)
            for v, i in zip(batch[cfg.messages_column], indices, strict=True)
        ]
        return {"messages": [c for c in chats if any(m["content"].strip() for m in c)]}

    def prompt_completion(batch: dict, indices: list[int]) -> dict:
        n = len(indices)
        completions = [_as_text(v) for v in batch[cfg.completion_column]]
        if cfg.prompt_template:
            rows = [{f: _as_text(batch[f][i]) for f in fields} for i in range(n)]
            try:
                prompts = [cfg.prompt_template.format(**row) for row in rows]
            except (ValueError, KeyError, IndexError, AttributeError) as err:
                raise UserError(f"data.prompt_template={cfg.prompt_template!r}: {first_line(err)}") from None
        else:
            prompts = [_as_text(v) for v in batch[cfg.prompt_column]]
        kept = [i for i in range(n) if prompts[i].strip() and completions[i].strip()]
        return {"prompt": [prompts[i] for i in kept], "completion": [completions[i] for i in kept]}

    def text(batch: dict, indices: list[int]) -> dict:
        texts = [_as_text(v) for v in batch[cfg.text_column]]
        return {"text": [t for t in texts if t.strip()]}

    return {"chat": chat, "prompt_completion": prompt_completion, "text": text}[fmt]


def normalise(ds: Dataset, fmt: str, cfg: SFTDataConfig, key: str) -> Dataset:
    """Check `ds` has the columns `fmt` needs and convert it to FORMAT_COLUMNS[fmt], dropping empty rows."""
    _check_columns(ds.column_names, fmt, cfg, key)
    out = ds.map(
        _normaliser(fmt, cfg, key),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        desc="Reading examples",
    )
    if len(out) == 0:
        raise UserError(f"{key}: no examples left after dropping rows with empty content ({len(ds)} rows read).")
    return out


def load_sft_data(cfg: SFTDataConfig) -> SFTData:
    """Read train and validation as `cfg` says, resolve data.format, and normalise both to one format.

    Validation is data.validation (a file, or a split of data.train's Hub dataset), or else a random
    data.validation_fraction of the (non-empty) training rows drawn with data.split_seed.
    """
    train_key = f"data.train ({cfg.train})"
    train = read_source(cfg.train, "data.train", cfg.hub_config, cfg.train_split)
    fmt = resolve_format(train.column_names, cfg, train_key)
    train = normalise(train, fmt, cfg, train_key)
    if cfg.validation is None:
        train, validation = split_validation(train, cfg)
    else:
        validation = normalise(read_validation(cfg), fmt, cfg, f"data.validation ({cfg.validation})")
    return SFTData(train, validation, fmt)


def data_format(ds: Dataset) -> str:
    """The format of a dataset that `load_sft_data` normalised, told by its columns."""
    for fmt, columns in FORMAT_COLUMNS.items():
        if all(c in ds.column_names for c in columns):
            return fmt
    raise ValueError(f"not a normalised SFT dataset: columns {ds.column_names}")


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------


NO_CHAT_TEMPLATE = (
    "data.chat_template: the tokenizer has no chat template, and chat data (data.format=chat) is rendered through "
    "one. Set data.chat_template to a Jinja template or a .jinja file (a base model has none: pick the template you "
    "want it to learn), or use data.format=prompt_completion."
)


def read_chat_template(spec: str) -> str:
    """data.chat_template: the template itself when it holds Jinja tags, else the file it names."""
    if "{{" in spec or "{%" in spec:
        return spec
    path = local_path(spec, "data.chat_template")
    if path is None or not path.is_file():
        raise UserError(
            f"data.chat_template={spec!r} is neither a Jinja template (it has no {{{{ }}}} or {{% %}} tags) nor an "
            "existing file. Give the template itself or the path to a .jinja file."
        )
    return path.read_text(encoding="utf-8")


def check_chat_template(cfg: SFTDataConfig, tokenizer: PreTrainedTokenizerBase, format: str) -> None:
    """For chat data: install data.chat_template on `tokenizer` (if set) and check that a usable template exists.

    Needs only the tokenizer, so that a missing or broken template stops the run before the model loads.
    Other formats do not use a chat template: nothing is checked or changed.
    """
    if format != "chat":
        return
    if cfg.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.chat_template)
    if not tokenizer.chat_template:
        raise UserError(NO_CHAT_TEMPLATE)
    where = "data.chat_template" if cfg.chat_template else "data.chat_template (null: the tokenizer's own template)"
    probe = [{"role": "user", "content": "ping4711"}, {"role": "assistant", "content": "pong4711"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as err:  # jinja2 syntax and runtime errors, raise_exception() in the template
        raise UserError(f"{where}: rendering a user/assistant chat failed: {first_line(err)}") from None
    if "ping4711" not in rendered or "pong4711" not in rendered:
        raise UserError(f"{where}: the template does not render the messages' content: {rendered[:200]!r}")
