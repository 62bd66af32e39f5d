"""Batches of causal-LM rows: padding, labels with the masked targets, position ids for packed rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from finetune.core.buckets import LengthBuckets
from finetune.training.accumulation import IGNORE_INDEX

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
