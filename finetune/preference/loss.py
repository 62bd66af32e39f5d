"""The preference loss: per-sequence log-probs of chosen and rejected completions in one forward, and DPO / IPO on
them against a reference.

**One forward.** A batch of B pairs (`finetune.preference.collate`) holds 2B sequences, chosen and rejected
interleaved (c0, r0, c1, r1, ...): padded (B, 2, W) rows, or padding-free one row with `sequence_ids`. The model
runs once on all of them; each sequence's log-prob is the sum of its completion tokens' log-probs.

**No full logits.** Where the model's output layer is a `ChunkedLossHead` (train.chunked_loss, SFT's head), the
head computes each target token's log-prob chunk by chunk from the hidden states
(`chunked_linear_cross_entropy_rows`) and sums them per sequence: the (tokens x vocabulary) fp32 logits never
exist. Otherwise the plain logits are used (a model the chunked-loss probe refuses).

**Exact accumulation.** `PreferenceLoss` returns the SUM over the batch's pairs of each pair's loss; the loop
divides by the window's pair count over all processes (`collate.pairs_in` counts them), so k micro-batches of b pairs
give the gradient of the mean over k*b pairs. RPO's NLL term is per pair (the chosen completion's mean token NLL),
so it too is a per-pair term; TRL's batch token-mean would change with the micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.lm.loss import chunked_linear_cross_entropy_rows, find_chunked_head
from finetune.preference.collate import ANSWER_TOKENS
from finetune.training.accumulation import IGNORE_INDEX

# The per-pair statistics a run reports, in this order (means over pairs); "loss" is the loop's own.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "logps/chosen", "logps/rejected")


def model_inputs(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the model's inputs, unshifted labels, sequence id per position) with the 2B sequences as rows (padded) or
    one packed row (padding-free); sequence 2i is pair i's chosen, 2i+1 its rejected."""
    labels = batch["labels"]
    if "sequence_ids" in batch:  # padding-free: one row, sequences told apart by position_ids
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        return inputs, labels, batch["sequence_ids"]
    pairs, _, width = labels.shape
    rows = 2 * pairs
    inputs = {"input_ids": batch["input_ids"].reshape(rows, width)}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].reshape(rows, width)
    sequences = torch.arange(rows, device=labels.device)[:, None].expand(rows, width)
    return inputs, labels.reshape(rows, width), sequences


def target_counts(batch: dict) -> torch.Tensor:
    """Completion tokens that carry a log-prob, per pair: (B, 2) [chosen, rejected], as the collator counted them."""
    return batch[ANSWER_TOKENS]


def _per_sequence(sequences: torch.Tensor, num_sequences: int):
    """A ChunkedLossHead loss_fn: each sequence's summed completion NLL (num_sequences,), chunked."""

    def loss_fn(hidden, weight, labels, bias, chunk_size):
        targets = labels[..., 1:]
        keep = targets != IGNORE_INDEX
        rows = chunked_linear_cross_entropy_rows(hidden[..., :-1, :][keep], weight, targets[keep], bias, chunk_size)
        summed = torch.zeros(num_sequences, dtype=rows.dtype, device=rows.device)
        return summed.index_add(0, sequences[..., 1:][keep], rows)

    return loss_fn


def sequence_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each pair's summed completion log-probs (B, 2) [chosen, rejected], fp32 (fp64 for an fp64 model), from one
    forward over all 2B sequences; differentiable when gradients are on."""
    inputs, labels, sequences = model_inputs(batch)
    count = 2 * len(batch[ANSWER_TOKENS])
    head = find_chunked_head(model)
    if head is not None:
        with head.targets(labels, loss_fn=_per_sequence(sequences, count)):
            nll = model(**inputs, use_cache=False).logits
            if head._targets is not None:
                raise RuntimeError("the model's forward never called its output layer; no log-probs were computed")
        return -nll.reshape(-1, 2)
    logits = model(**inputs, use_cache=False).logits
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    shifted = logits[..., :-1, :][keep]
    shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))
    rows = F.cross_entropy(shifted, targets[keep], reduction="none")
    summed = torch.zeros(count, dtype=rows.dtype, device=rows.device).index_add(0, sequences[..., 1:][keep], rows)
    return -summed.reshape(-1, 2)


@dataclass
class PairTerms:
    """What a batch gives: each pair's loss (B,) and statistics (B, len(STATS)), detached."""

    losses: torch.Tensor
    stats: torch.Tensor


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, dpo) -> PairTerms:
    """Each pair's loss from the (B, 2) [chosen, rejected] summed log-probs of the policy and the reference and the
    completion lengths; `dpo` is the config's dpo group (loss, beta, label_smoothing, sft_weight).

    sigmoid (DPO): -log sigmoid(beta * h), smoothed by label_smoothing eps as (1-eps) * that + eps * -log sigmoid(
    -beta * h) (conservative DPO), where h = (chosen - ref chosen) - (rejected - ref rejected). ipo (IPO): (h -
    1/(2 beta))^2 on length-averaged log-probs, as TRL. sft_weight (RPO) adds the chosen completion's mean token NLL.
    Rewards are beta * (log-prob - reference log-prob) of what the loss uses."""
    reference = reference.to(policy.dtype)
    lengths = counts.clamp_min(1).to(policy.dtype)
    if dpo.loss == "ipo":
        policy, reference = policy / lengths, reference / lengths
    ratios = policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    if dpo.loss == "ipo":
        losses = (h - 1 / (2 * dpo.beta)) ** 2
    else:
        eps = dpo.label_smoothing
        losses = -F.logsigmoid(dpo.beta * h) * (1 - eps) - F.logsigmoid(-dpo.beta * h) * eps
    if dpo.sft_weight:
        nll = -(policy[:, 0] if dpo.loss == "ipo" else policy[:, 0] / lengths[:, 0])
        losses = losses + dpo.sft_weight * nll
    with torch.no_grad():
        rewards = dpo.beta * ratios.detach()
        stats = torch.stack(
            [
                rewards[:, 0],
                rewards[:, 1],
                rewards[:, 0] - rewards[:, 1],
                (rewards[:, 0] > rewards[:, 1]).to(rewards.dtype),
                policy[:, 0].detach(),
                policy[:, 1].detach(),
            ],
            dim=1,
        )
    return PairTerms(losses, stats)


class StatsMeter:
    """The preference statistics of the training pairs since the last log record: sums on the device, one
    all-reduce when a record is logged (every process at the same steps)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: torch.Tensor | None = None
        self._pairs = 0

    def add(self, stats: torch.Tensor) -> None:
        sums = stats.sum(dim=0).double()
        self._sums = sums if self._sums is None else self._sums + sums
        self._pairs += len(stats)

    def pop(self, accelerator) -> dict[str, float]:
        """The interval's means over every process's pairs, and start a new interval."""
        if self._sums is None:
            return {}
        pairs = torch.tensor([float(self._pairs)], dtype=torch.float64, device=self._sums.device)
        totals = torch.cat([self._sums, pairs])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        *sums, pairs = totals.tolist()
        self.reset()
        return {name: value / pairs for name, value in zip(STATS, sums, strict=True)}


class PreferenceLoss:
    """The training loss of a preference batch: the SUM of its pairs' losses (the loop normalises by the window's
    pair count), the policy's log-probs from one forward and the reference's from `reference`
    (`finetune.preference.reference`); statistics go to `meter` while the model trains."""

    def __init__(self, dpo, reference) -> None:
        self.dpo, self.reference = dpo, reference
        self.meter = StatsMeter()

    def terms(self, model: torch.nn.Module, batch: dict) -> PairTerms:
        reference = self.reference.logps(model, batch)  # first: no activations of the policy held meanwhile
        policy = sequence_logps(model, batch)
        return preference_losses(policy, reference, target_counts(batch), self.dpo)

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        terms = self.terms(model, batch)
        if model.training and torch.is_grad_enabled():
            self.meter.add(terms.stats)
        return terms.losses.sum()
