"""Normalised SFT data (`finetune.lm.data`) to token ids with a loss mask on the targets: `tokenize_sft` cuts or
drops examples longer than data.max_length, drops those left without a target token, and says so in a
`TokenizeReport` (a set with no example left is a UserError); the prompts evaluation generates from
(`generation_prompts`); what the dry run says about the data (`describe_data`).

Labels are the input ids with IGNORE_INDEX (-100) wherever a token carries no loss; the model shifts them by one
(`labels[..., 1:]` are the targets), so the number of loss terms of a row is `count_next_token_terms`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.core.data import token_lengths
from finetune.core.errors import UserError, first_line
from finetune.core.schemas import SFTDataConfig
from finetune.core.token_cache import cached_tokenization
from finetune.lm.data import GENERATION_TAG, NO_CHAT_TEMPLATE, data_format
from finetune.training.accumulation import IGNORE_INDEX

# What happened to an example: a column of the mapped dataset, dropped before `tokenize_sft` returns.
_KEPT, _TRUNCATED, _TOO_LONG, _NO_TARGETS = 0, 1, 2, 3


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


def tokenize_sft(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: SFTDataConfig, name: str = "data"
) -> tuple[Dataset, TokenizeReport]:
    """Columns `input_ids` and `labels` (same length; -100 where a token carries no loss) of a normalised dataset.

    Targets are the completion (+ EOS) or the assistant turns (+ the end-of-turn the template emits), or every
    token with data.train_on_prompt (text: always every token, + EOS). Chats go through the tokenizer's chat
    template (call `check_chat_template` first); an assistant message that opens a chat has no prompt and is
    not a target. Examples longer than data.max_length are cut or dropped (data.too_long); examples left
    without a target token are dropped. Row order is kept. When no example is left, a UserError about the
    set `name` (train, validation) says why and what to change.
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

    settings = {key: getattr(cfg, key) for key in ("max_length", "too_long", "train_on_prompt")}
    tokenized, report = cached_tokenization(ds, tokenizer, settings, build, code=tokenize_sft)
    report = TokenizeReport(**report)
    if report.kept == 0:
        raise UserError(_nothing_left(name, report, cfg))
    return tokenized, report


def _nothing_left(name: str, report: TokenizeReport, cfg: SFTDataConfig) -> str:
    """Why tokenizing left no example of the set `name`, and what to change."""
    if not report.examples:
        return f"{name}: no example to tokenize."
    length = f"data.max_length={cfg.max_length:,}"
    reasons, fixes = [], []
    if report.dropped_too_long:
        reasons.append(f"{report.dropped_too_long:,} longer than {length} tokens (data.too_long=drop)")
        fixes.append("raise data.max_length, or set data.too_long=truncate to cut them instead")
    if report.dropped_no_targets:
        reasons.append(
            f"{report.dropped_no_targets:,} with no target token within {length} tokens (the prompt fills it, or "
            "no completion or assistant turn follows a prompt)"
        )
        fixes.append(
            "raise data.max_length if the prompts fill it"
            + ("" if cfg.train_on_prompt else ", or set data.train_on_prompt=true to learn the prompts too")
        )
    dropped = f"all {report.examples:,} were" if report.examples > 1 else "the only one was"
    return (
        f"{name}: no example left after tokenizing: {dropped} dropped, {' and '.join(reasons)}. "
        f"To keep them: {'; '.join(fixes)}."
    )


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
    from finetune.core.data import describe_lengths

    lines = []
    for name, ds, report in (("train", train, train_report), ("validation", validation, val_report)):
        lengths = token_lengths(ds)
        rows = f"; {len(ds):,} packed rows of up to {report.max_length:,} tokens" if packed else ""
        lines += [
            f"{name}: {report.describe()}{rows}",
            f"  {'rows' if packed else 'examples'}: {describe_lengths(lengths)}",
        ]
    return lines, max(token_lengths(train), default=1)
