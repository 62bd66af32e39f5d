"""Normalised preference pairs (`finetune.preference.data`) to token ids: `tokenize_pairs` gives each pair its
prompt's ids and the ids of each completion alone, cuts pairs longer than data.max_length (TRL's rule: the
prompt's start first, then the completions' ends), drops pairs whose completions are left identical, and says so
in a `PairReport`; the prompts evaluation generates from (`preference_generation_prompts`); what the dry run says
about the pairs (`describe_pairs`).

Text pairs: BOS (if the tokenizer adds one) + prompt, and completion + EOS, each tokenized on its own as SFT's
prompt/completion pairs are. Chat pairs: the prompt rendered with the generation prompt, and the rest of the
whole rendered conversation (the answer and the end-of-turn the template emits), no special tokens added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.core.data import describe_lengths
from finetune.core.errors import UserError
from finetune.core.schemas import DPODataConfig
from finetune.core.token_cache import cached_tokenization
from finetune.lm.tokenize import _eos, _render, bos_prefix
from finetune.preference.data import NO_CHAT_TEMPLATE, pairs_format

TOKEN_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
# What happened to a pair: columns of the mapped dataset, dropped before `tokenize_pairs` returns.
_FLAGS = ["_prompt_cut", "_completion_cut", "_identical"]


@dataclass
class PairReport:
    """What `tokenize_pairs` did to the pairs."""

    pairs: int = 0  # read
    kept: int = 0
    prompts_truncated: int = 0  # kept pairs whose prompt lost its start
    completions_truncated: int = 0  # kept pairs whose completions lost their ends too
    dropped_identical: int = 0  # chosen and rejected the same tokens (once cut to max_length)
    tokens: int = 0  # of the kept pairs: prompt + chosen and prompt + rejected
    max_length: int = 0

    def describe(self) -> str:
        return (
            f"{self.pairs:,} pairs: {self.kept:,} kept ({self.prompts_truncated:,} prompts and "
            f"{self.completions_truncated:,} completions cut to fit {self.max_length:,} tokens), "
            f"{self.dropped_identical:,} dropped with identical completions; {self.tokens:,} tokens"
        )


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


def _prompt_texts(tokenizer: PreTrainedTokenizerBase, fmt: str, prompts: list) -> list[str]:
    """The text each prompt is tokenized from: itself, or (chat) rendered with the generation prompt."""
    if fmt == "text":
        return prompts
    if not tokenizer.chat_template:
        raise UserError(NO_CHAT_TEMPLATE)
    return _render(tokenizer, prompts, True)


def _completion_texts(tokenizer: PreTrainedTokenizerBase, prompts: list, heads: list[str], completions: list):
    """Chat completions as text: the whole conversation rendered, less the prompt's rendering (`heads`), so the
    answer's tokens are what follows the generation prompt, up to and with the template's end of turn."""
    wholes = _render(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)], False)
    for head, whole, prompt in zip(heads, wholes, prompts, strict=True):
        if not whole.startswith(head):
            start = repr(prompt[0]["content"][:60]) if prompt else "[]"
            raise UserError(
                f"data.chat_template: the pair whose prompt starts {start} renders differently with its answer than "
                f"its prompt does with the generation prompt (the rendering does not go on from {head[-40:]!r}), "
                "so the answer's tokens cannot be told from the prompt's. Use a template whose generation prompt "
                "is how the assistant turn starts."
            )
    return [whole[len(head) :] for head, whole in zip(heads, wholes, strict=True)]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _pair_ids(tokenizer: PreTrainedTokenizerBase, fmt: str, batch: dict) -> tuple[list, list, list]:
    """Untruncated (prompt ids, chosen ids, rejected ids) of a batch of normalised pairs."""
    heads = _prompt_texts(tokenizer, fmt, batch["prompt"])
    if fmt == "chat":
        chosen = _completion_texts(tokenizer, batch["prompt"], heads, batch["chosen"])
        rejected = _completion_texts(tokenizer, batch["prompt"], heads, batch["rejected"])
        bos, eos = [], []  # the template holds every special token
    else:
        chosen, rejected = batch["chosen"], batch["rejected"]
        bos, eos = bos_prefix(tokenizer), _eos(tokenizer)
    return (
        [bos + p for p in _encode(tokenizer, heads)],
        [c + eos for c in _encode(tokenizer, chosen)],
        [r + eos for r in _encode(tokenizer, rejected)],
    )


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int, bos: int | None
) -> tuple[list[int], list[int], list[int]]:
    """TRL's rule for a pair whose longer sequence exceeds `max_length`: keep the prompt's last `max_prompt_length`
    tokens (the part next to the answer), then cut both completions to what is left. A leading BOS is kept: a model
    reads position 0 as its start. The prompt keeps at most max_length - 1 tokens, so each completion keeps one."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    limit = min(max_prompt_length, max_length - 1)
    if len(prompt) > limit:
        head = prompt[:1] if bos is not None and prompt[0] == bos and limit > 1 else []
        prompt = head + prompt[len(prompt) - (limit - len(head)) :]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


LENGTH_COLUMN = "length"


def tokenize_pairs(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DPODataConfig, name: str = "data", dropped_identical: int = 0
) -> tuple[Dataset, PairReport]:
    """Columns `prompt_ids`, `chosen_ids`, `rejected_ids` (the completions' tokens only) of normalised pairs.

    Pairs longer than data.max_length are cut (`truncate_pair`, data.max_prompt_length); pairs whose chosen and
    rejected ids are then the same are dropped. Row order is kept. Chat pairs go through the tokenizer's chat
    template (call `check_preference_chat_template` first). When no pair is left, a UserError about the set
    `name` (train, validation) says so.
    """
    if len(ds) == 0:
        raise UserError(f"{name}: no preference pair to tokenize.")
    fmt = pairs_format(ds)
    max_length = cfg.max_length
    max_prompt_length = max_length - 1 if cfg.max_prompt_length is None else cfg.max_prompt_length
    bos = tokenizer.bos_token_id

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {c: [] for c in [*TOKEN_COLUMNS, *_FLAGS]}
        for p, c, r in zip(*_pair_ids(tokenizer, fmt, batch), strict=True):
            cut = truncate_pair(p, c, r, max_length, max_prompt_length, bos)
            for column, ids in zip(TOKEN_COLUMNS, cut, strict=True):
                out[column].append(ids)
            out["_prompt_cut"].append(len(cut[0]) < len(p))
            out["_completion_cut"].append(len(cut[1]) < len(c) or len(cut[2]) < len(r))
            out["_identical"].append(cut[1] == cut[2])
        return out

    def build() -> tuple[Dataset, dict]:
        tokenized = ds.map(
            encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="Tokenizing pairs"
        )
        table = tokenized.with_format("arrow")[:]  # whole columns at once
        lengths = {c: pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False) for c in TOKEN_COLUMNS}
        identical = table.column("_identical").to_numpy()
        kept = ~identical
        report = PairReport(
            pairs=len(ds),
            kept=int(kept.sum()),
            prompts_truncated=int(table.column("_prompt_cut").to_numpy()[kept].sum()),
            completions_truncated=int(table.column("_completion_cut").to_numpy()[kept].sum()),
            dropped_identical=int(identical.sum()),
            tokens=int((2 * lengths["prompt_ids"] + lengths["chosen_ids"] + lengths["rejected_ids"])[kept].sum()),
            max_length=max_length,
        )
        tokenized = tokenized.remove_columns(_FLAGS)
        if not kept.all():
            tokenized = tokenized.select(np.flatnonzero(kept)).flatten_indices(keep_in_memory=True)
        return tokenized, asdict(report)

    settings = {"max_length": max_length, "max_prompt_length": cfg.max_prompt_length}
    tokenized, report = cached_tokenization(ds, tokenizer, settings, build, code=tokenize_pairs)
    # `length`: what the loaders sort and size batches by (`finetune.core.data.token_lengths`)
    tokenized = tokenized.add_column(LENGTH_COLUMN, sequence_lengths(tokenized))
    report = PairReport(**report)
    # Pairs whose texts were already identical (`load_preference_data` dropped them) count as read and dropped.
    report.pairs += dropped_identical
    report.dropped_identical += dropped_identical
    if report.kept == 0:
        raise UserError(
            f"{name}: no preference pair left after tokenizing: all {report.pairs:,} have chosen and rejected "
            f"completions whose tokens are the same within data.max_length={max_length:,} tokens. Raise "
            "data.max_length (or lower data.max_prompt_length) if the completions differ only past it."
        )
    return tokenized, report


# --------------------------------------------------------------------------------------------
# Generation prompts and the dry run
# --------------------------------------------------------------------------------------------


def preference_generation_prompts(ds: Dataset, tokenizer: PreTrainedTokenizerBase, n: int) -> list[dict]:
    """Up to `n` prompts {prompt, prompt_ids, reference} from the first normalised pairs; reference = the chosen
    completion (chat: its first message's content). `prompt_ids` are tokenized exactly as in training (text: BOS
    if the tokenizer adds one; chat: the template with its generation prompt): feed those to `generate`."""
    if n <= 0:
        return []
    fmt = pairs_format(ds)
    rows = ds[: min(n, len(ds))]
    texts = _prompt_texts(tokenizer, fmt, rows["prompt"])
    bos = bos_prefix(tokenizer) if fmt == "text" else []
    references = [chosen[0]["content"] for chosen in rows["chosen"]] if fmt == "chat" else rows["chosen"]
    return [
        {"prompt": text, "prompt_ids": bos + ids, "reference": reference}
        for text, ids, reference in zip(texts, _encode(tokenizer, texts), references, strict=True)
    ]


def sequence_lengths(ds: Dataset) -> list[int]:
    """Per tokenized pair, its longer sequence: prompt + the longer completion (what a padded batch is sized by)."""
    table = ds.select_columns(TOKEN_COLUMNS).with_format("arrow")[:]
    lengths = {c: pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False) for c in TOKEN_COLUMNS}
    return (lengths["prompt_ids"] + np.maximum(lengths["chosen_ids"], lengths["rejected_ids"])).tolist()


def longest_answers(ds: Dataset) -> int:
    """The most answer tokens of a tokenized pair, chosen and rejected together: the log-probs a pair computes."""
    table = ds.select_columns(["chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    lengths = [pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False) for c in table.column_names]
    return int((lengths[0] + lengths[1]).max()) if len(ds) else 1


def describe_pairs(
    train: Dataset, train_report: PairReport, validation: Dataset, val_report: PairReport
) -> tuple[list[str], int]:
    """What the dry run says about tokenized pairs, and the tokens of the longest training sequence (prompt + the
    longer completion: where memory peaks)."""
    lines = []
    for name, ds, report in (("train", train, train_report), ("validation", validation, val_report)):
        lines += [f"{name}: {report.describe()}", f"  sequences: {describe_lengths(sequence_lengths(ds))}"]
    return lines, max(sequence_lengths(train), default=1)
