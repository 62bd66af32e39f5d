"""Fine-tune a pretrained transformers model for text classification.

    accelerate launch recipes/classify.py                                  # recipes/configs/classify/default.yaml
    accelerate launch recipes/classify.py --config my.yaml train.lr=3e-5   # YAML, then dotted overrides
    accelerate launch recipes/classify.py --help                           # every key, its type, default and doc

How it runs (CPU, GPUs, DeepSpeed, FSDP, several machines) is the launcher's business: see accelerate_configs/.
The loop's policy and guarantees (exact accumulation, checkpoints, resume, early stopping) are in
`finetune.training`; this file says what is particular to classification: its data, model, loss and evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers
from accelerate.utils import set_seed

from finetune.classify import collate, evaluate
from finetune.classify import model as classifier
from finetune.classify.data import describe_data, load_classification_data, tokenize
from finetune.core import metric_names, modeling
from finetune.core.errors import exit_on_user_error
from finetune.core.schemas import ClassifyConfig
from finetune.plan.dry_run import report_dry_run
from finetune.report import reporting
from finetune.training import batches, loop
from finetune.training.accumulation import count_label_terms
from finetune.training.run import Run, launch, open_run, start_run

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "classify" / "default.yaml"


def setup(argv: list[str]):
    """Parse and check everything cheap — config, output dir, checkpoint to resume, data, model limits — before
    any weights load."""
    run = open_run(ClassifyConfig, argv, DEFAULT_CONFIG, "recipes/classify.py")
    cfg = run.cfg
    data = load_classification_data(cfg.data)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model_config = modeling.load_model_config(cfg.model, num_labels=data.num_outputs)
    modeling.check_max_length(cfg.data.max_length, model_config, tokenizer)
    modeling.check_lora_targets(cfg.lora, model_config)
    metric_names.check_metric_names(cfg.resolved_metrics(), regression=cfg.data.task == "regression")
    return launch(run, model_config, transformers.AutoModelForSequenceClassification), data, tokenizer


@exit_on_user_error
def main(argv: list[str]) -> None:
    run, data, tokenizer = setup(argv)
    if run.dry_run:
        return dry_run(run, data, tokenizer)
    cfg, accelerator = run.cfg, run.accelerator
    start_run(run)
    set_seed(cfg.train.seed)  # before the model: the new head draws its weights from it

    # ---- model
    loading = run.weights_loading()  # the weights' dtype; with model.quantization, bitsandbytes' config
    model = classifier.load_classifier(cfg.model, data.label_names, tokenizer, data.task, **loading)
    model, optimizer = batches.prepare_model(run, model, lora_task_type="SEQ_CLS")

    # ---- data
    with accelerator.main_process_first():
        train_set = tokenize(data.train, tokenizer, cfg.data.max_length)
        val_set = tokenize(data.validation, tokenizer, cfg.data.max_length)
    loaders = batches.make_loaders(
        run,
        model,
        optimizer,
        train_set,
        val_set,
        make_collator=lambda buckets: collate.padding_collator(tokenizer, buckets=buckets),
        loss=classifier.classification_loss,
        group_by_length=cfg.data.group_by_length,
    )

    # ---- train, evaluate: the loop's policy is finetune.training.loop.fit
    task = loop.Task(
        classifier.classification_loss, count_label_terms, evaluate.evaluator(run, model, loaders.validation)
    )
    described = f"{len(data.train)} train / {len(data.validation)} validation examples, {data.num_outputs} outputs"
    outcome = loop.fit(run, model, optimizer, tokenizer, loaders.train, task, data_summary=described)

    # ---- final/: the last model, or with early stopping the best evaluated one
    sizes = len(data.train), len(data.validation)
    metrics, names, validation = cfg.resolved_metrics(), data.label_names, loaders.validation
    reporting.finish_run(run, model, tokenizer, outcome, metrics, sizes, label_names=names, validation=validation)


def dry_run(run: Run, data, tokenizer) -> None:
    """--dry-run: what the run would train on, for how many steps, and in how much memory; no weights read."""
    if run.accelerator.is_main_process:
        lines, longest = describe_data(data, tokenizer, run.cfg.data.max_length)
        model_config = modeling.load_model_config(run.cfg.model, num_labels=data.num_outputs)
        auto_class = transformers.AutoModelForSequenceClassification
        report_dry_run(run, lines, len(data.train), longest, model_config, auto_class)


if __name__ == "__main__":
    main(sys.argv[1:])
