"""Scoring a causal LM: loss and perplexity from summed losses and token counts, and greedy generations.

Loss is summed per process and all-reduced with the number of target tokens, so every token counts once
whatever the number of processes (never a gather of (N, T, V) logits, never a mean of per-batch means).
Processes with fewer batches run an empty one (every label ignored): under FSDP or ZeRO-3 every forward
is a collective, so every process must run as many.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.core.errors import UserError
from finetune.lm.probes import chunked_evaluation_loss
from finetune.training.accumulation import IGNORE_INDEX, count_next_token_terms
from finetune.training.run import Run


@torch.no_grad()
def lm_loss_sums(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> tuple[float, int]:
    """(summed next-token loss, target tokens) over an unprepared dataloader, over all processes."""
    batches = list(dataloader)
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(batches) / world) if batches else 0
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    terms = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for i in range(rounds):
        index = i * world + rank
        batch = batches[index] if index < len(batches) else _ignored(batches[0])
        batch = {name: tensor.to(accelerator.device, non_blocking=True) for name, tensor in batch.items()}
        total += loss_fn(model, batch).double()
        terms += count_next_token_terms(batch)
    sums = (
        accelerator.reduce(torch.stack([total, terms]), reduction="sum") if world > 1 else torch.stack([total, terms])
    )
    loss_sum, count = sums.tolist()
    return loss_sum, int(count)


def _ignored(batch: dict) -> dict:
    """A batch shaped like `batch` that carries no loss term."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def evaluate_lm(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    on_nonfinite: str = "stop",
) -> dict[str, float | str]:
    """Mean loss per target token and perplexity (identical on every process)."""
    was_training = model.training
    model.eval()
    loss_sum, count = lm_loss_sums(accelerator, model, dataloader, loss_fn)
    model.train(was_training)
    loss = loss_sum / count if count else float("nan")
    metrics: dict[str, float | str] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if not math.isfinite(loss):
        message = (
            f"the validation loss is not finite ({loss}) over {count} target tokens: the weights diverged "
            "(or no validation example has a target token). Lower train.lr, keep train.weights_dtype=fp32, "
            "or check the data"
        )
        if on_nonfinite == "stop":
            raise UserError(
                f"{message}; resume from an earlier checkpoint: train.resume_from=<run>/checkpoints/step_N."
            )
        metrics["warning"] = message
    return metrics


@torch.no_grad()
def generate_greedy(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer,
    prompts: list[dict],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of `prompts` ({prompt_ids}), split over the processes and gathered in order.

    Every process runs the same number of `generate` calls and, with several processes, `synced_gpus`
    keeps them stepping together until all are done (FSDP and ZeRO-3 gather weights in every forward)."""
    from accelerate.utils import gather_object

    if not prompts:
        return []
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = math.ceil(len(prompts) / world)
    mine = (prompts[rank * per_process : (rank + 1) * per_process] or prompts[:1])[:per_process]
    mine = mine + mine[-1:] * (per_process - len(mine))  # equal counts: the padding is dropped below
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(mine), batch_size):
        chunk = [p["prompt_ids"] for p in mine[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=accelerator.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=accelerator.device
        )
        output = unwrapped.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            synced_gpus=world > 1,
        )
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    unwrapped.train(was_training)
    owned = max(0, min(per_process, len(prompts) - rank * per_process))
    gathered = gather_object(texts[:owned]) if world > 1 else texts[:owned]
    return list(gathered)[: len(prompts)]


def score_generations(prompts: list[dict], completions: list[str]) -> dict[str, float]:
    """exact_match: the share of completions equal to their reference, surrounding whitespace ignored."""
    if not prompts:
        return {}
    hits = sum(c.strip() == p["reference"].strip() for p, c in zip(prompts, completions, strict=True))
    return {"exact_match": hits / len(prompts)}


def write_generations(path: Path, step: int, prompts: list[dict], completions: list[str]) -> None:
    """One JSON line per prompt: the prompt, the reference and what the model generated at `step`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for prompt, completion in zip(prompts, completions, strict=True):
            record = {
                "step": step,
                "prompt": prompt["prompt"],
                "reference": prompt["reference"],
                "generated": completion,
            }
            f.write(json.dumps(record) + "\n")


def evaluator(run: Run, model, tokenizer, val_loader, prompts: list[dict], loss_fn) -> Callable[[int], dict]:
    """The SFT recipe's evaluation at a step: loss and perplexity on the validation set, then greedy answers to
    `prompts` scored by exact match and written to the run's generations/ (main process)."""
    accelerator, cfg = run.accelerator, run.cfg
    loss_fn = chunked_evaluation_loss(model, loss_fn)  # no full-vocabulary fp32 logits, whatever training does

    def evaluate(step: int) -> dict:
        metrics = evaluate_lm(accelerator, model, val_loader, loss_fn, cfg.train.on_nonfinite_loss)
        return {**metrics, **generations_scored(run, model, tokenizer, prompts, step)}

    return evaluate


def generations_scored(run: Run, model, tokenizer, prompts: list[dict], step: int) -> dict[str, float]:
    """Greedy answers to `prompts` at `step`, scored by exact match and written to the run's generations/ (main
    process): what every causal-LM recipe's evaluation adds to its loss."""
    accelerator, cfg = run.accelerator, run.cfg
    completions = generate_greedy(accelerator, model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    if accelerator.is_main_process and prompts:
        write_generations(run.dir.generations_at(step), step, prompts, completions)
    return score_generations(prompts, completions)
