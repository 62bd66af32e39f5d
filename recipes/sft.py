"""Supervised fine-tuning of a causal language model on chats, prompt/completion pairs or plain text.

    accelerate launch recipes/sft.py                                       # recipes/configs/sft/default.yaml
    accelerate launch recipes/sft.py --config recipes/configs/sft/demo.yaml   # offline: learns a task from scratch
    accelerate launch recipes/sft.py --help                                # every key, its type, default and doc

Loss is on completion / assistant tokens only (data.train_on_prompt=true: on everything), each accumulation
window normalised by its target tokens over all processes. How it runs (CPU, GPUs, DeepSpeed, FSDP, several
machines) is the launcher's business: see accelerate_configs/. The loop's policy and guarantees are in
`finetune.training`; this file says what is particular to SFT: its data, model, loss and evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers
from accelerate.utils import set_seed

from finetune.core import modeling
from finetune.core.errors import exit_on_user_error
from finetune.core.schemas import SFTConfig
from finetune.lm import evaluate, probes
from finetune.lm.collate import SFTCollator
from finetune.lm.data import check_chat_template, load_sft_data
from finetune.lm.loss import next_token_loss
from finetune.lm.packing import pack_examples
from finetune.lm.tokenize import describe_data, generation_prompts, tokenize_sft
from finetune.plan.dry_run import report_dry_run
from finetune.report import reporting
from finetune.training import batches, loop
from finetune.training.accumulation import count_next_token_terms
from finetune.training.run import Run, launch, open_run, start_run

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft" / "default.yaml"


def setup(argv: list[str]):
    """Parse and check everything cheap — config, output dir, checkpoint to resume, data, chat template, model
    limits — before any weights load."""
    run = open_run(SFTConfig, argv, DEFAULT_CONFIG, "recipes/sft.py")
    cfg = run.cfg
    data = load_sft_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    check_chat_template(cfg.data, tokenizer, data.format)
    model_config = modeling.load_model_config(cfg.model)
    modeling.check_max_length(cfg.data.max_length, model_config, tokenizer)
    modeling.check_lora_targets(cfg.lora, model_config, transformers.AutoModelForCausalLM)
    return launch(run, model_config, transformers.AutoModelForCausalLM), data, tokenizer


@exit_on_user_error
def main(argv: list[str]) -> None:
    run, data, tokenizer = setup(argv)
    cfg, accelerator = run.cfg, run.accelerator
    # ---- data: targets masked, packed if asked; before the model, so data with nothing left to train on is refused
    with accelerator.main_process_first():
        train_set, train_report, val_set, val_report = tokenized(cfg, data, tokenizer)
    if run.dry_run:
        return dry_run(run, train_set, train_report, val_set, val_report)
    start_run(run)
    run.log.info(f"train: {train_report.describe()}\nvalidation: {val_report.describe()}")
    set_seed(cfg.train.seed)  # before the model: model.random_init draws its weights from it

    # ---- model
    model = modeling.load_causal_lm(cfg.model, tokenizer, **run.weights_loading())
    # Flash kernels keep packed examples apart only in a batch of one row: the collator then flattens a batch.
    flatten = cfg.data.packing and model.config._attn_implementation.startswith("flash_attention")
    if cfg.data.packing:
        probes.check_packing_supported(model, rows_per_batch=1 if flatten else None)
    adapt = probes.enable_exact_chunked_loss if cfg.train.chunked_loss else None
    model, optimizer = batches.prepare_model(run, model, lora_task_type="CAUSAL_LM", adapt=adapt)
    loaders = batches.make_loaders(
        run,
        model,
        optimizer,
        train_set,
        val_set,
        make_collator=lambda buckets: SFTCollator.for_tokenizer(tokenizer, flatten=flatten, buckets=buckets),
        loss=next_token_loss,
        group_by_length=cfg.data.group_by_length and not cfg.data.packing,
        shard_validation=False,  # every token counted once, the set collated once for every evaluation
    )
    prompts = generation_prompts(data.validation, tokenizer, cfg.eval.num_generations)

    # ---- train, evaluate: the loop's policy is finetune.training.loop.fit
    evaluate_now = evaluate.evaluator(run, model, tokenizer, loaders.validation, prompts, next_token_loss)
    task = loop.Task(next_token_loss, count_next_token_terms, evaluate_now)
    rows = f"packed rows of {cfg.data.max_length}" if cfg.data.packing else "examples"
    described = f"{len(train_set)} train / {len(val_set)} validation {rows}"
    outcome = loop.fit(run, model, optimizer, tokenizer, loaders.train, task, data_summary=described)

    # ---- final/: the last model, or with early stopping the best evaluated one
    stats = {"train_data": train_report.describe(), "validation_data": val_report.describe()}
    scores, sizes = ["loss", "perplexity", "exact_match"], (len(train_set), len(val_set))
    reporting.finish_run(run, model, tokenizer, outcome, scores, sizes, data_stats=stats, validation=loaders.validation)


def tokenized(cfg: SFTConfig, data, tokenizer):
    """Train and validation as token ids with loss masks, packed into rows if asked, and what was done."""
    train_set, train_report = tokenize_sft(data.train, tokenizer, cfg.data, "train")
    val_set, val_report = tokenize_sft(data.validation, tokenizer, cfg.data, "validation")
    if cfg.data.packing:
        train_set = pack_examples(train_set, cfg.data.max_length)
        val_set = pack_examples(val_set, cfg.data.max_length)
    return train_set, train_report, val_set, val_report


def dry_run(run: Run, train_set, train_report, val_set, val_report) -> None:
    """--dry-run: what the run would train on, for how many steps, and in how much memory; no weights read."""
    if run.accelerator.is_main_process:
        lines, longest = describe_data(train_set, train_report, val_set, val_report, run.cfg.data.packing)
        model_config = modeling.load_model_config(run.cfg.model)
        report_dry_run(run, lines, len(train_set), longest, model_config, transformers.AutoModelForCausalLM)


if __name__ == "__main__":
    main(sys.argv[1:])
