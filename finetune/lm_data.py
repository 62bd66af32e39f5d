"""Data of the causal-LM SFT recipe: read chats, prompt/completion pairs or plain text; tokenize with a loss mask;
pack; pad.

Labels are the input ids with IGNORE_INDEX (-100) wherever a token carries no loss; the model shifts them by one
(`labels[..., 1:]` are the targets), so the number of loss terms of a row is `count_next_token_terms`.
"""

from __future__ import annotations

import json
import math
import re
import string
from bisect import bisect_left, insort
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable
from transformers import PreTrainedTokenizerBase

from finetune.accumulation import IGNORE_INDEX
from finetune.compile import LengthBuckets
from finetune.data import read_source, read_validation, token_lengths
from finetune.errors import UserError, first_line
from finetune.paths import local_path
from finetune.recipe_configs import SFTDataConfig
from finetune.token_cache import cached_tokenization

# Columns of each format after `load_sft_data`.
FORMAT_COLUMNS = {"chat": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}
# A template that marks assistant output itself (TRL's convention, read by `return_assistant_tokens_mask`).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Outcome of tokenizing one example (a column dropped before `tokenize_sft` returns).
_KEPT, _TRUNCATED, _TOO_LONG, _NO_TARGETS = 0, 1, 2, 3


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


def split_validation(train: Dataset, cfg: SFTDataConfig) -> tuple[Dataset, Dataset]:
    """(train, validation): a random data.validation_fraction of train held out, drawn with data.split_seed."""
    try:
        split = train.train_test_split(test_size=cfg.validation_fraction, seed=cfg.split_seed)
    except ValueError as err:
        raise UserError(
            f"data.validation_fraction={cfg.validation_fraction}: cannot carve a validation split from {len(train)} "
            f"training examples ({err}). Give data.validation or more data."
        ) from None
    return split["train"], split["test"]


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


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizeReport:
    """What `tokenize_sft` did to the examples."""

    examples: int = 0  # read
    truncated: int = 0  # kept, cut to max_length
    dropped_too_long: int = 0  # longer than max_length with too_long=drop
    dropped_no_targets: int = 0  # no target token (left): e.g. the prompt alone fills max_length
    tokens: int = 0  # in the kept examples
    target_tokens: int = 0  # loss terms: labels[1:] != -100
    max_length: int = 0

    @property
    def kept(self) -> int:
        return self.examples - self.dropped_too_long - self.dropped_no_targets

    def describe(self) -> str:
        share = f" ({self.target_tokens / self.tokens:.0%})" if self.tokens else ""
        return (
            f"{self.examples:,} examples: {self.kept:,} kept ({self.truncated:,} truncated to {self.max_length:,} "
            f"tokens), {self.dropped_too_long:,} dropped as too long, {self.dropped_no_targets:,} dropped with no "
            f"target token; {self.tokens:,} tokens, {self.target_tokens:,} of them targets{share}"
        )


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos_token_id] when the tokenizer starts its encodings with BOS (Llama, Gemma), else [] (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens (character offsets) overlapping any span; both in order, as transformers' assistant mask does."""
    mask = [False] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = True
    return mask


def _render(tokenizer: PreTrainedTokenizerBase, chats: list[list[dict]], generation_prompt: bool) -> list[str]:
    """Chats rendered by the tokenizer's template; an error names data.chat_template and the chat that raised it."""
    if not chats:
        return []
    try:
        return tokenizer.apply_chat_template(chats, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception:  # jinja2 errors and the template's raise_exception(): find the chat, for the message
        _raise_for_failing_chat(tokenizer, chats, generation_prompt)
        raise


def _chat_start(chat: list[dict]) -> str:
    """How a user finds a chat in the data: the start of its first message."""
    return repr(chat[0]["content"][:60]) if chat else "[]"


def _raise_for_failing_chat(tokenizer: PreTrainedTokenizerBase, chats: list[list[dict]], generation_prompt: bool):
    for chat in chats:
        try:
            tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as err:  # jinja2 errors and the template's raise_exception()
            raise UserError(
                f"data.chat_template: rendering the chat that starts {_chat_start(chat)} failed: {first_line(err)}"
            ) from None


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, chats: list[list[dict]]):
    """(rendered chats, per chat the character spans of its assistant turns) by rendering prefixes.

    The span of assistant message i runs from the end of `messages[:i]` rendered with the generation prompt to
    the end of `messages[:i+1]`: the content and whatever the template emits after it (end-of-turn token,
    newline), which is what the model must generate after the prompt, and to stop; the role header is prompt.
    This is TRL's `{% generation %}` convention. An assistant message that opens a chat has no prompt and no span.
    Templates that render a turn differently once later messages follow (Qwen3 drops the empty think block of
    earlier turns) are handled by `_search_span`.
    """
    queries = [(c, i) for c, chat in enumerate(chats) for i, m in enumerate(chat) if m["role"] == "assistant" and i]
    fulls = _render(tokenizer, chats, False)
    before = _render(tokenizer, [chats[c][:i] for c, i in queries], True)
    after = _render(tokenizer, [chats[c][: i + 1] for c, i in queries], False)
    spans: list[list[tuple[int, int]]] = [[] for _ in chats]
    for (c, i), b, a in zip(queries, before, after, strict=True):
        cursor = spans[c][-1][1] if spans[c] else 0
        if a.startswith(b) and fulls[c].startswith(a) and len(b) >= cursor:
            span = (len(b), len(a))
        else:
            span = _search_span(tokenizer, chats[c][: i + 1], b, a, fulls[c], cursor)
        if span is None:
            raise UserError(
                f"data.chat_template: in the chat that starts {_chat_start(chats[c])}, assistant message {i + 1} "
                "cannot be located in the rendered chat: the template renders it differently within the whole "
                "chat. Use a template that marks assistant output with {% generation %}...{% endgeneration %}, "
                "or set data.train_on_prompt=true."
            )
        spans[c].append(span)
    return fulls, spans


def _search_span(
    tokenizer: PreTrainedTokenizerBase, upto: list[dict], before: str, after: str, full: str, cursor: int
) -> tuple[int, int] | None:
    """The span of the last message of `upto` found in `full` (from `cursor`) by its text, when prefixes disagree.

    Searches for generation prompt + content + what follows the content when it is rendered last (the end of
    turn), so a user message quoting the answer does not match; None if not found.
    """
    content = upto[-1]["content"]
    at = after.rfind(content)
    if not content or at < 0:
        return None
    plain = _render(tokenizer, [upto[:-1]], False)[0]
    header = before[len(plain) :] if before.startswith(plain) else ""
    pattern = header + content + after[at + len(content) :]
    found = full.find(pattern, cursor)
    return None if found < 0 else (found + len(header), found + len(pattern))


def _tokenize_chats(tokenizer: PreTrainedTokenizerBase, chats: list[list[dict]], train_on_prompt: bool):
    """(input ids, target mask) per chat; the template supplies every special token (BOS included)."""
    if not chats:
        return [], []
    if not tokenizer.chat_template:
        raise UserError(NO_CHAT_TEMPLATE)
    if train_on_prompt:
        ids = tokenizer(_render(tokenizer, chats, False), add_special_tokens=False)["input_ids"]
        return ids, [[True] * len(x) for x in ids]
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "data.train_on_prompt=false on chats needs a fast tokenizer (a tokenizer.json) to locate the assistant "
            "tokens; this model's tokenizer is a slow (Python) one. Set data.train_on_prompt=true or use another "
            "tokenizer."
        )
    if GENERATION_TAG.search(tokenizer.get_chat_template()):  # the template marks assistant output itself
        try:
            out = tokenizer.apply_chat_template(
                chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception:  # a template error: name the chat
            _raise_for_failing_chat(tokenizer, chats, False)
            raise
        return out["input_ids"], [[bool(x) for x in mask] for mask in out["assistant_masks"]]
    texts, spans = _assistant_spans(tokenizer, chats)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = [_overlap_mask(offsets, s) for offsets, s in zip(encoded["offset_mapping"], spans, strict=True)]
    return encoded["input_ids"], masks


def _tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str], train_on_prompt: bool
):
    """BOS (if the tokenizer adds one) + prompt + completion + EOS, each part tokenized on its own so that the
    boundary is where generation starts; targets: completion and EOS (everything with train_on_prompt)."""
    if not prompts:
        return [], []
    head, tail = bos_prefix(tokenizer), _eos(tokenizer)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    ids = [head + p + c + tail for p, c in zip(p_ids, c_ids, strict=True)]
    masks = [
        [train_on_prompt] * (len(head) + len(p)) + [True] * (len(c) + len(tail))
        for p, c in zip(p_ids, c_ids, strict=True)
    ]
    return ids, masks


def _tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]):
    head, tail = bos_prefix(tokenizer), _eos(tokenizer)
    ids = [head + x + tail for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return ids, [[True] * len(x) for x in ids]


def tokenize_sft(ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: SFTDataConfig) -> tuple[Dataset, TokenizeReport]:
    """Columns `input_ids` and `labels` (same length; -100 where a token carries no loss) of a normalised dataset.

    Targets are the completion (+ EOS) or the assistant turns (+ the end-of-turn the template emits), or every
    token with data.train_on_prompt (text: always every token, + EOS). Chats go through the tokenizer's chat
    template (call `check_chat_template` first); an assistant message that opens a chat has no prompt and is
    not a target. Examples longer than data.max_length are cut or dropped (data.too_long); examples left
    without a target token are dropped. Row order is kept.
    """
    fmt = data_format(ds)
    max_length, drop_long = cfg.max_length, cfg.too_long == "drop"

    def encode(batch: dict) -> dict:
        if fmt == "chat":
            ids, masks = _tokenize_chats(tokenizer, batch["messages"], cfg.train_on_prompt)
        elif fmt == "prompt_completion":
            ids, masks = _tokenize_pairs(tokenizer, batch["prompt"], batch["completion"], cfg.train_on_prompt)
        else:
            ids, masks = _tokenize_texts(tokenizer, batch["text"])
        out: dict[str, list] = {"input_ids": [], "labels": [], "_status": [], "_targets": []}
        for x, mask in zip(ids, masks, strict=True):
            status = _KEPT
            if len(x) > max_length:
                status = _TOO_LONG if drop_long else _TRUNCATED
                x, mask = x[:max_length], mask[:max_length]
            labels = [t if m else IGNORE_INDEX for t, m in zip(x, mask, strict=True)]
            targets = sum(mask[1:])  # the first token is never predicted
            if status != _TOO_LONG and targets == 0:
                status = _NO_TARGETS
            out["input_ids"].append(x)
            out["labels"].append(labels)
            out["_status"].append(status)
            out["_targets"].append(targets)
        return out

    def build() -> tuple[Dataset, dict]:
        tokenized, report = _tokenize_and_count(ds, encode, max_length)
        return tokenized, asdict(report)

    settings = {name: getattr(cfg, name) for name in ("max_length", "too_long", "train_on_prompt")}
    tokenized, report = cached_tokenization(ds, tokenizer, settings, build, code=tokenize_sft)
    return tokenized, TokenizeReport(**report)


def _tokenize_and_count(ds: Dataset, encode, max_length: int) -> tuple[Dataset, TokenizeReport]:
    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="Tokenizing")
    table = tokenized.with_format("arrow")[:]  # whole columns at once (datasets >= 4 iterates a column by rows)
    status = table.column("_status").to_numpy()
    targets = table.column("_targets").to_numpy()
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    kept = status <= _TRUNCATED
    report = TokenizeReport(
        examples=len(ds),
        truncated=int((status == _TRUNCATED).sum()),
        dropped_too_long=int((status == _TOO_LONG).sum()),
        dropped_no_targets=int((status == _NO_TARGETS).sum()),
        tokens=int(lengths[kept].sum()),
        target_tokens=int(targets[kept].sum()),
        max_length=max_length,
    )
    tokenized = tokenized.remove_columns(["_status", "_targets"])
    if not kept.all():
        tokenized = tokenized.select(np.flatnonzero(kept)).flatten_indices(keep_in_memory=True)
    return tokenized, report


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int | None = None) -> list[list[int]]:
    """Bins (lists of indices) of total length <= capacity: longest item first, each into the fullest bin it fits.

    Deterministic: ties keep input order (or the order of a permutation drawn from `seed`). Best-fit decreasing
    packs as tightly as first-fit decreasing (both use at most 11/9 of the optimal bins + 1) and, keyed by free
    space, finds the bin with a bisect instead of a scan; it is TRL's default ("bfd") too.
    """
    order = np.arange(len(lengths))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with that much room
    spaces: list[int] = []  # sorted keys of by_space
    for i in order.tolist():
        size = int(lengths[i])
        k = bisect_left(spaces, size)
        if k == len(spaces):
            b, room = len(bins), capacity - size
            bins.append([i])
        else:
            old = spaces[k]
            group = by_space[old]
            b, room = group.pop(), old - size
            if not group:
                del by_space[old]
                spaces.pop(k)
            bins[b].append(i)
        if room > 0:
            if room in by_space:
                by_space[room].append(b)
            else:
                by_space[room] = [b]
                insort(spaces, room)
    return bins


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    cls = pa.LargeListArray if offsets[-1] >= 2**31 else pa.ListArray
    return cls.from_arrays(pa.array(offsets, type=pa.int64() if cls is pa.LargeListArray else pa.int32()), values)


def pack_examples(ds: Dataset, max_length: int, seed: int | None = None) -> Dataset:
    """Tokenized examples packed into rows of at most `max_length` tokens, by `best_fit_decreasing`.

    Columns: input_ids, labels, position_ids (0, 1, ... restarting at every example, from which transformers
    builds block-diagonal causal attention, see `SFTCollator`) and num_examples. No example is split across
    rows. The label of each example's first token is -100: the shifted loss would otherwise predict it from the
    previous example's last token. An example's first label is never a loss term unpacked either, so a packed
    row has exactly the loss terms (`labels[1:] != -100`) of its examples, and the loss does not change.
    """
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]  # honours an indices mapping
    ids_col, labels_col = (table.column(c).combine_chunks() for c in ("input_ids", "labels"))
    lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than the packed rows' {max_length}")
    if len(lengths) and lengths.min() == 0:
        raise ValueError("cannot pack empty examples")
    bins = best_fit_decreasing(lengths, max_length, seed)

    # The examples in packing order, end to end, then cut into rows: arrow's take keeps this vectorised.
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    sizes = lengths[order]
    starts = np.cumsum(sizes) - sizes  # where each example lands in the packed token stream
    total = int(sizes.sum())
    take = pa.array(order)
    packed_ids = ids_col.take(take).flatten()
    packed_labels = labels_col.take(take).flatten().to_numpy(zero_copy_only=False).copy()
    packed_labels[starts] = IGNORE_INDEX
    steps = np.ones(total, dtype=np.int32)  # positions 0, 1, ... per example, as a cumulative sum of steps
    if total:
        steps[starts] = 0
        steps[starts[1:]] = 1 - sizes[:-1]
    position_ids = np.cumsum(steps, dtype=np.int32)

    num_examples = np.asarray([len(b) for b in bins], dtype=np.int32)
    first_of_row = np.cumsum(num_examples) - num_examples
    row_sizes = np.add.reduceat(sizes, first_of_row) if len(bins) else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int64)
    packed = pa.table(
        {
            "input_ids": _list_array(offsets, packed_ids),
            "labels": _list_array(offsets, pa.array(packed_labels)),
            "position_ids": _list_array(offsets, pa.array(position_ids)),
            "num_examples": pa.array(num_examples),
        }
    )
    # A fingerprint from the input's saves datasets from hashing every token of the table.
    fingerprint = Hasher.hash(["pack_examples", ds._fingerprint, max_length, seed])
    return Dataset(InMemoryTable(packed), fingerprint=fingerprint)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _longs(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long)


@dataclass
class SFTCollator:
    """Pads examples to the longest row of the batch (rounded up to `pad_to_multiple_of`): input_ids with
    `pad_token_id`, labels with -100.

    Unpacked rows get an `attention_mask`. Packed rows (with `position_ids`) get `position_ids`, the pad tail
    numbered 0, 1, ... as a sequence of its own, and NO attention_mask. What transformers (5.x) does with them:

    - `masking_utils._preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)` only when
      `attention_mask is None` AND `cache is None`. That function starts a new sequence wherever consecutive
      position ids do not step by +1, and returns None when every row holds one sequence. `create_causal_mask`
      (sdpa, eager, flex) then ANDs the causal mask with "same sequence" and compares positions within a sequence:
      block-diagonal causal attention. With an attention_mask (even all ones) no sequence is detected.
    - `cache is None` needs `use_cache=False`: decoder forwards default use_cache to config.use_cache (True for
      most checkpoints) and then create a DynamicCache even in training, which silently turns the detection off
      and lets examples attend to each other (checked on a tiny Llama: packed logits equal the separate ones only
      with use_cache=False, or with gradient checkpointing, which forces it off). Call the model with
      `use_cache=False` for training and evaluation losses.
    - flash_attention_2/3 ignore that mask and detect packing themselves (`_is_packed_sequence`), but only at
      batch size 1; with more rows they run plain causal attention across examples. `flatten=True` concatenates
      the batch into one row (padding-free, as TRL's DataCollatorWithFlattening) for those kernels. Do not use
      it with sdpa/eager, which would build one (total x total) mask.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten: bool = False
    buckets: LengthBuckets | None = None  # a compiled model: pad rows to one of a few lengths (not flattened)

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs) -> SFTCollator:
        """A collator padding with the tokenizer's pad token (else EOS: padding is masked out either way)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad_token_id=pad if pad is not None else 0, **kwargs)

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        packed = {"position_ids" in e for e in examples}
        if len(packed) > 1:
            raise ValueError("a batch mixes packed rows (with position_ids) and unpacked ones")
        ids = [_longs(e["input_ids"]) for e in examples]
        labels = [_longs(e["labels"]) for e in examples]
        if self.flatten:
            return self._flattened(examples, ids, labels)
        longest = max(len(x) for x in ids)
        width = self.buckets.width(longest, len(ids)) if self.buckets else self._width(longest)
        batch_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
            batch_ids[row, : len(x)] = x
            batch_labels[row, : len(y)] = y
        batch = {"input_ids": batch_ids, "labels": batch_labels}
        if packed == {True}:
            positions = torch.arange(width).repeat(len(ids), 1)
            for row, e in enumerate(examples):
                n = len(ids[row])
                positions[row, :n] = _longs(e["position_ids"])
                positions[row, n:] = torch.arange(width - n)  # the pad tail: a sequence of its own
            batch["position_ids"] = positions
        else:
            lengths = torch.tensor([len(x) for x in ids])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch

    def _flattened(self, examples: list[dict], ids: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
        """One row: every example of the batch one after another, each row's first label masked (the previous
        row's last token must not predict it), positions restarting per example."""
        positions = [
            _longs(e["position_ids"]) if "position_ids" in e else torch.arange(len(x))
            for e, x in zip(examples, ids, strict=True)
        ]
        labels = [torch.cat([torch.tensor([IGNORE_INDEX]), y[1:]]) for y in labels]
        n = sum(len(x) for x in ids)
        pad = self._width(n) - n
        return {
            "input_ids": torch.cat([*ids, torch.full((pad,), self.pad_token_id)])[None],
            "labels": torch.cat([*labels, torch.full((pad,), IGNORE_INDEX)])[None],
            "position_ids": torch.cat([*positions, torch.arange(pad)])[None],
        }


# --------------------------------------------------------------------------------------------
# Generation prompts
# --------------------------------------------------------------------------------------------


def generation_prompts(ds: Dataset, tokenizer: PreTrainedTokenizerBase, n: int) -> list[dict]:
    """Up to `n` prompts {prompt, prompt_ids, reference} from the first examples of a normalised dataset.

    Chat: the messages before the last assistant turn, rendered with the generation prompt; reference = that
    turn's content. prompt_completion: the prompt; reference = the completion. Text data has no prompts: [].
    `prompt_ids` are tokenized exactly as in training (chat: no special tokens added, the template has them;
    prompt_completion: BOS if the tokenizer adds one); feed those to `generate`, not a re-tokenized `prompt`.
    """
    fmt = data_format(ds)
    out: list[dict] = []
    if fmt == "text" or n <= 0:
        return out
    if fmt == "prompt_completion":
        head = bos_prefix(tokenizer)
        rows = ds[: min(n, len(ds))]
        for prompt, completion in zip(rows["prompt"], rows["completion"], strict=True):
            ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out.append({"prompt": prompt, "prompt_ids": ids, "reference": completion})
        return out
    if not tokenizer.chat_template:
        raise UserError(NO_CHAT_TEMPLATE)
    for messages in (row["messages"] for row in ds):
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last == 0:  # no assistant turn after a prompt
            continue
        prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append({"prompt": prompt, "prompt_ids": ids, "reference": messages[last]["content"]})
        if len(out) == n:
            break
    return out


def describe_data(
    train: Dataset, train_report: TokenizeReport, validation: Dataset, val_report: TokenizeReport, packed: bool
) -> tuple[list[str], int]:
    """What the dry run says about tokenized (and maybe packed) data, and the tokens of the longest training
    row (where memory peaks)."""
    from finetune.dry_run import describe_lengths

    lines = []
    for name, ds, report in (("train", train, train_report), ("validation", validation, val_report)):
        lengths = token_lengths(ds)
        rows = f"; {len(ds):,} packed rows of up to {report.max_length:,} tokens" if packed else ""
        lines += [
            f"{name}: {report.describe()}{rows}",
            f"  {'rows' if packed else 'examples'}: {describe_lengths(lengths)}",
        ]
    return lines, max(token_lengths(train), default=1)
