"""Preference tuning (DPO, IPO) of a causal language model on pairs of a prompt with a chosen and a rejected answer.

    accelerate launch recipes/dpo.py                                        # recipes/configs/dpo/default.yaml
    accelerate launch recipes/dpo.py --config recipes/configs/dpo/demo.yaml    # offline: DPO after the SFT demo
    accelerate launch recipes/dpo.py --help                                 # every key, its type, default and doc

Chosen and rejected go through the model in one forward; their log-probs are summed over the completion tokens
from the hidden states in chunks (no full-vocabulary logits). The loss is a mean over pairs, each accumulation
window normalised by its pairs over all processes. The reference (dpo.reference) is the model with its LoRA
adapters off, or log-probs computed once before training and cached, or a frozen copy. The loop's policy and
guarantees are in `finetune.training`; this file says what is particular to DPO: its data, reference, loss and
evaluation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import transformers
from accelerate.utils import set_seed

from finetune.core import modeling
from finetune.core.errors import exit_on_user_error
from finetune.core.schemas import DPOConfig
from finetune.lm import probes
from finetune.plan.dry_run import report_dry_run
from finetune.preference import evaluate, reference
from finetune.preference.collate import PreferenceCollator, pairs_in
from finetune.preference.data import check_preference_chat_template, load_preference_data
from finetune.preference.loss import PreferenceLoss
from finetune.preference.setup import disable_dropout, merge_check_batches, reference_kind
from finetune.preference.tokenize import describe_pairs, longest_answers, preference_generation_prompts, tokenize_pairs
from finetune.report import reporting
from finetune.training import batches, loop
from finetune.training.run import Run, launch, open_run, start_run

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "dpo" / "default.yaml"
AUTO_CLASS = transformers.AutoModelForCausalLM


def setup(argv: list[str]):
    """Parse and check everything cheap — config, output dir, checkpoint to resume, pairs, chat template, model
    limits, the reference — before any weights load."""
    run = open_run(DPOConfig, argv, DEFAULT_CONFIG, "recipes/dpo.py")
    cfg = run.cfg
    data = load_preference_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    check_preference_chat_template(cfg.data, tokenizer, data.format)
    model_config = modeling.load_model_config(cfg.model)
    modeling.check_max_length(cfg.data.max_length, model_config, tokenizer)
    modeling.check_lora_targets(cfg.lora, model_config, AUTO_CLASS)
    launch(run, model_config, AUTO_CLASS)
    reference_kind(cfg, run.accelerator)  # a reference this launch cannot hold is refused here
    return run, data, tokenizer


@exit_on_user_error
def main(argv: list[str]) -> None:
    run, data, tokenizer = setup(argv)
    cfg, accelerator = run.cfg, run.accelerator
    # ---- data: token ids of prompt, chosen and rejected; before the model, so that bad pairs are refused first
    with accelerator.main_process_first():
        train_set, train_report = tokenize_pairs(data.train, tokenizer, cfg.data, "train", data.dropped_identical_train)
        val_set, val_report = tokenize_pairs(
            data.validation, tokenizer, cfg.data, "validation", data.dropped_identical_validation
        )
    if run.dry_run:
        return dry_run(run, train_set, train_report, val_set, val_report)
    start_run(run)
    run.log.info(f"train: {train_report.describe()}\nvalidation: {val_report.describe()}")
    set_seed(cfg.train.seed)  # before the model: model.random_init draws its weights from it

    # ---- model, and the reference: adapters off, precomputed log-probs, or a frozen copy
    model = modeling.load_causal_lm(cfg.model, tokenizer, **run.weights_loading())
    kind = reference_kind(cfg, accelerator)
    initial = reference.InitialModel.of(kind, model)  # its hash, or a frozen copy, before LoRA and prepare
    if cfg.dpo.padding_free:
        probes.check_packing_supported(model, rows_per_batch=1)

    def adapt(model):
        if cfg.dpo.disable_dropout:
            disable_dropout(model)
        if cfg.train.chunked_loss:
            probes.enable_exact_chunked_loss(model)

    model, optimizer = batches.prepare_model(run, model, lora_task_type="CAUSAL_LM", adapt=adapt)
    # padded for the precomputing pass: the same numbers whatever dpo.padding_free
    sets = {"train": train_set, "validation": val_set}
    live, sets = initial.reference(run, model, sets, PreferenceCollator.for_tokenizer(tokenizer), adapt)
    train_set, val_set = sets["train"], sets["validation"]
    run.log.info(f"reference: {kind}")
    loss = PreferenceLoss(cfg.dpo, live)
    loaders = batches.make_loaders(
        run,
        model,
        optimizer,
        train_set,
        val_set,
        make_collator=lambda buckets: PreferenceCollator.for_tokenizer(tokenizer, padding_free=cfg.dpo.padding_free),
        loss=loss,
        group_by_length=False,
        shard_validation=False,  # every pair counted once, the set collated once for every evaluation
    )
    loss.meter.reset()  # what a micro_batch_size=auto rehearsal recorded is not training
    prompts = preference_generation_prompts(data.validation, tokenizer, cfg.eval.num_generations)

    # ---- train, evaluate: the loop's policy is finetune.training.loop.fit
    evaluate_now = evaluate.evaluator(run, model, tokenizer, loaders.validation, prompts, loss)
    task = loop.Task(loss, pairs_in, evaluate_now, log_record=lambda: loss.meter.pop(accelerator))
    described = f"{len(train_set)} train / {len(val_set)} validation pairs"
    outcome = loop.fit(run, model, optimizer, tokenizer, loaders.train, task, data_summary=described)

    # ---- final/: the last model, or with early stopping the best evaluated one
    stats = {"train_data": train_report.describe(), "validation_data": val_report.describe(), "reference": kind}
    scores = ["loss", "accuracy", "rewards/margin", "exact_match"]
    validation = merge_check_batches(loaders.validation)
    reporting.finish_run(
        run, model, tokenizer, outcome, scores, (len(train_set), len(val_set)), data_stats=stats, validation=validation
    )


def dry_run(run: Run, train_set, train_report, val_set, val_report) -> None:
    """--dry-run: the pairs, steps, and memory (2 sequences per pair, log-probs on the answers only; dropout off as
    dpo.disable_dropout says; a frozen copy with dpo.reference=model)."""
    cfg = run.cfg
    if run.accelerator.is_main_process:
        lines, longest = describe_pairs(train_set, train_report, val_set, val_report)
        model_config = modeling.load_model_config(cfg.model)
        reference_copy = reference_kind(cfg, run.accelerator) == "model"
        lora = dataclasses.replace(cfg.lora, dropout=0.0) if cfg.dpo.disable_dropout else cfg.lora
        answers = longest_answers(train_set)
        report_dry_run(run, lines, len(train_set), longest, model_config, AUTO_CLASS, 2, reference_copy, answers, lora)


if __name__ == "__main__":
    main(sys.argv[1:])
