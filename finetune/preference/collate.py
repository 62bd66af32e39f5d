"""Batches of preference pairs: each pair's two sequences (prompt + chosen, prompt + rejected), with labels on
the completion tokens only, padded side by side or laid end to end in one row (padding-free).

Labels are the input ids with IGNORE_INDEX (-100) on the prompt and the padding, unshifted as in SFT: the model
predicts labels[t + 1] from position t. A sequence's first label is always -100: it is never predicted (padded),
and in a padding-free row the previous sequence's last token must not predict it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from finetune.training.accumulation import IGNORE_INDEX

REFERENCE_COLUMN = "ref_logps"  # precomputed reference log-probs of a pair: [chosen, rejected]
ANSWER_TOKENS = "answer_tokens"  # (B, 2): the tokens of each pair's answers that carry a log-prob


def _sequences(examples: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input ids, labels) of every sequence of the batch, in the order chosen_0, rejected_0, chosen_1, ..."""
    ids, labels = [], []
    for e in examples:
        prompt = list(e["prompt_ids"])
        for completion in (e["chosen_ids"], e["rejected_ids"]):
            x = torch.as_tensor(prompt + list(completion), dtype=torch.long)
            y = x.clone()
            y[: max(len(prompt), 1)] = IGNORE_INDEX
            ids.append(x)
            labels.append(y)
    return ids, labels


@dataclass
class PreferenceCollator:
    """Collates pairs {prompt_ids, chosen_ids, rejected_ids[, ref_logps]}.

    Padded (default): `input_ids`, `labels`, `attention_mask` of shape (B, 2, W), [:, 0] the chosen sequences and
    [:, 1] the rejected ones, right-padded (with `pad_token_id`; labels -100, attention 0) to the longest of the 2B.

    `padding_free`: the 2B sequences end to end in one row, chosen_0, rejected_0, chosen_1, ...: `input_ids`,
    `labels`, `position_ids` restarting at 0 for each sequence and `sequence_ids` (2i: pair i's chosen, 2i + 1 its
    rejected), all (1, T), and NO attention_mask: transformers tells packed sequences apart by their position ids
    only without one (see `finetune.lm.collate.SFTCollator`; the model must run with use_cache=False).

    Either way, `answer_tokens` (B, 2): the tokens of each answer that carry a log-prob (the loss's lengths and the
    pair count, known without reading a tensor back from the device), and `ref_logps` (B, 2) float32 when the
    examples carry precomputed reference log-probs (all or none).
    """

    pad_token_id: int
    padding_free: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs) -> PreferenceCollator:
        """A collator padding with the tokenizer's pad token (else EOS: padding is masked out either way)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad_token_id=pad if pad is not None else 0, **kwargs)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        with_reference = {REFERENCE_COLUMN in e for e in examples}
        if len(with_reference) > 1:
            raise ValueError(f"a batch mixes pairs with {REFERENCE_COLUMN} and pairs without")
        ids, labels = _sequences(examples)
        batch = self._padding_free(ids, labels) if self.padding_free else self._padded(ids, labels)
        batch[ANSWER_TOKENS] = torch.tensor([int((y[1:] != IGNORE_INDEX).sum()) for y in labels]).view(-1, 2)
        if with_reference == {True}:
            batch[REFERENCE_COLUMN] = torch.tensor([e[REFERENCE_COLUMN] for e in examples], dtype=torch.float32)
        return batch

    def _padded(self, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        batch_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
            batch_ids[row, : len(x)] = x
            batch_labels[row, : len(y)] = y
        lengths = torch.tensor([len(x) for x in ids])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        pairs = len(ids) // 2
        return {
            "input_ids": batch_ids.view(pairs, 2, width),
            "labels": batch_labels.view(pairs, 2, width),
            "attention_mask": mask.view(pairs, 2, width),
        }

    def _padding_free(self, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(len(x)) for x in ids])[None],
            "sequence_ids": torch.cat([torch.full((len(x),), i, dtype=torch.long) for i, x in enumerate(ids)])[None],
        }


def pairs_in(batch: dict) -> torch.Tensor:
    """The pairs of a collated batch, a 0-d long tensor on its device: the loss terms that exact gradient
    accumulation divides by (a pair's loss is one term, whatever its length)."""
    answers = batch[ANSWER_TOKENS]
    return answers.new_full((), answers.shape[0])  # filled on the device: no copy from the host
