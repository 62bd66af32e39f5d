"""Two processes on CPU (gloo), launched as users do: every validation example scored exactly once, and kill -9 then
resume from an epoch-end checkpoint ends bitwise equal to the uninterrupted run."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import CLASSIFY, assert_same_weights, interrupt, launch, read_jsonl, run_args, run_to_end
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, tokenize
from finetune.classify.evaluate import classification_metrics, predict
from finetune.core.config import build_config
from finetune.core.data import make_dataloader
from finetune.core.schemas import DataConfig
from finetune.training.checkpoints.layout import PROGRESS_FILE, list_checkpoints


def test_two_processes_score_each_validation_example_once(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "out"
    args = [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",  # 37 examples: uneven over 2 processes x batches of 4
        "data.max_length=32",
        "train.epochs=2",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "eval.batch_size=4",
        "eval.every_n_steps=10",
        f"output.dir={out}",
    ]
    result = launch(CLASSIFY, args, processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "effective batch 16 = micro-batch 8 x accumulation 1 x 2 process(es)" in result.stdout
    assert result.stdout.count("done:") == 1, "only the main process reports"

    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_examples"] == 37
    assert results["step"] == 2 * 15  # 240 examples / (8 per micro-batch x 2 processes) per epoch
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_num_examples" in r]
    assert all(r["eval_num_examples"] == 37 for r in evals)

    # The same weights scored in this single process give the same metrics.
    from accelerate import Accelerator

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    data_cfg = build_config(
        DataConfig, [("test", {"train": str(toy_data["train"]), "validation": str(toy_data["validation"])})]
    )
    val = tokenize(load_classification_data(data_cfg).validation, tokenizer, 32)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_dataloader(val, 5, padding_collator(tokenizer)))
    single = classification_metrics(predict(accelerator, accelerator.prepare(model), loader))
    assert single["num_examples"] == 37
    assert single["accuracy"] == results["accuracy"]
    assert single["f1_macro"] == results["f1_macro"]
    assert single["loss"] == pytest.approx(results["loss"], rel=1e-5)


def test_kill_9_then_resume_with_two_processes_from_an_epoch_end_checkpoint(tiny_bert, toy_data, tmp_path):
    """2 processes x micro-batch 4 x accumulation 2: 15 steps per epoch; checkpoints at epoch ends only."""
    settings = [
        "data.group_by_length=false",  # the other sampler: Accelerate's seedable random sampler
        "train.epochs=3",
        "checkpoint.every_n_steps=null",
        "checkpoint.at_epoch_end=true",
    ]
    reference = tmp_path / "reference"
    run_to_end(run_args(tiny_bert, toy_data, reference, *settings), processes=2)
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, *settings)
    interrupt(args, 2, signal.SIGKILL, after_step=20, output_dir=output_dir)
    assert not (output_dir / "final").exists()
    latest = list_checkpoints(output_dir)[-1]
    progress = json.loads((latest / PROGRESS_FILE).read_text())
    assert progress["step"] in (15, 30) and progress["step"] < 45  # an epoch end, not the last step
    assert (progress["epoch"], progress["batches_into_epoch"]) == (progress["step"] // 15, 0)
    run_to_end([*args, "train.resume_from=latest"], processes=2)
    assert_same_weights(reference, output_dir)
