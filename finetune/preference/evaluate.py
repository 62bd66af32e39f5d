"""Scoring a preference model on pairs: the loss and the preference statistics (rewards, accuracy, log-probs) as
means over every pair once, whatever the number of processes, and greedy generations for a few prompts scored by
exact match against the chosen completion. Training's evaluation and finetune-eval run this same code."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from finetune.core.errors import UserError
from finetune.lm.evaluate import generations_scored
from finetune.preference.loss import STATS, PreferenceLoss


@torch.no_grad()
def preference_metrics(accelerator, model, batches, loss: PreferenceLoss, on_nonfinite: str = "stop") -> dict:
    """Mean loss and STATS over the pairs of `batches` (unprepared, the same on every process: each takes every
    W-th batch, and all run as many forwards), in eval mode."""
    batches = list(batches)
    world, rank = accelerator.num_processes, accelerator.process_index
    sums = torch.zeros(len(STATS) + 2, dtype=torch.float64, device=accelerator.device)  # loss, STATS, pairs
    was_training = model.training
    model.eval()
    try:
        for i in range(math.ceil(len(batches) / world) if batches else 0):
            index = i * world + rank
            batch = batches[min(index, len(batches) - 1)]
            batch = {name: tensor.to(accelerator.device, non_blocking=True) for name, tensor in batch.items()}
            terms = loss.terms(model, batch)
            if index < len(batches):  # a process past the end ran a repeat, not counted
                sums[0] += terms.losses.double().sum()
                sums[1:-1] += terms.stats.double().sum(dim=0)
                sums[-1] += len(terms.losses)
    finally:
        model.train(was_training)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    total, *stats, pairs = sums.tolist()
    metrics: dict = {"loss": total / pairs if pairs else float("nan")}
    metrics.update({name: value / pairs if pairs else float("nan") for name, value in zip(STATS, stats, strict=True)})
    metrics["pairs"] = int(pairs)
    if not math.isfinite(metrics["loss"]):
        message = (
            f"the validation loss is not finite ({metrics['loss']}) over {int(pairs)} pairs: the weights diverged. "
            "Lower train.lr or dpo.beta, keep train.weights_dtype=fp32, or check the data"
        )
        if on_nonfinite == "stop":
            raise UserError(f"{message}; resume from an earlier checkpoint: train.resume_from=<run>/checkpoints/step_N")
        metrics["warning"] = message
    return metrics


def evaluator(run, model, tokenizer, val_loader, prompts: list[dict], loss: PreferenceLoss) -> Callable[[int], dict]:
    """The DPO recipe's evaluation at a step: the preference metrics on the validation pairs, then greedy answers
    to `prompts` scored by exact match against the chosen completion, written to generations/ (main process)."""
    accelerator, cfg = run.accelerator, run.cfg

    def evaluate(step: int) -> dict:
        metrics = preference_metrics(accelerator, model, val_loader, loss, cfg.train.on_nonfinite_loss)
        return {**metrics, **generations_scored(run, model, tokenizer, prompts, step)}

    return evaluate
