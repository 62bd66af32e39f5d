"""A regression head (one output, float labels, MSE), in one process: data, model and metrics. The recipe and
finetune-eval on it are in tests/recipes/test_regression.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import write_rows
from scipy import stats
from sklearn import metrics as skm
from transformers import AutoTokenizer, pipeline

from finetune.classify.data import load_classification_data
from finetune.classify.evaluate import Predictions, classification_metrics
from finetune.classify.model import load_classifier
from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.schemas import DataConfig, ModelConfig


def regression_config(**values) -> DataConfig:
    return build_config(DataConfig, [("test", {"task": "regression", "label_column": "score", **values})])


def test_scores_are_float32_and_the_validation_split_is_plain_random(tmp_path):
    rows = [{"text": f"text {i}", "score": i / 7} for i in range(50)]  # all distinct: nothing to stratify by
    cfg = regression_config(train=str(write_rows(tmp_path / "t.jsonl", rows)), validation_fraction=0.2, split_seed=3)
    data = load_classification_data(cfg)
    assert data.task == "regression" and data.label_names == [] and data.num_outputs == 1
    assert data.train.features["label"].dtype == "float32"
    plain = Dataset.from_list(rows).train_test_split(test_size=0.2, seed=3)
    assert data.validation["text"] == plain["test"]["text"]
    assert data.validation["label"] == pytest.approx([r["score"] for r in plain["test"]], abs=1e-6)
    other = load_classification_data(regression_config(train=cfg.train, validation_fraction=0.2, split_seed=4))
    assert other.validation["text"] != data.validation["text"]


def test_int_scores_and_a_validation_file(tmp_path):
    train = write_rows(tmp_path / "t.csv", [{"text": f"t{i}", "score": i % 5} for i in range(10)])
    val = write_rows(tmp_path / "v.csv", [{"text": "a", "score": 2.5}, {"text": "b", "score": -1}])
    data = load_classification_data(regression_config(train=str(train), validation=str(val)))
    assert data.train["label"][:5] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert data.validation["label"] == [2.5, -1.0]
    assert data.validation.features["label"].dtype == "float32"


@pytest.mark.parametrize(
    ("scores", "found"), [(["high", "low"], "found string values such as 'high'"), ([True, False], "found bool")]
)
def test_labels_that_are_not_numbers_are_refused(tmp_path, scores, found):
    path = write_rows(tmp_path / "t.jsonl", [{"text": f"t{i}", "score": s} for i, s in enumerate(scores * 3)])
    with pytest.raises(UserError) as err:
        load_classification_data(regression_config(train=str(path)))
    message = str(err.value)
    assert f"data.train ({path}): data.label_column='score' must hold numbers for data.task=regression" in message
    assert found in message


def test_a_validation_file_with_text_scores_is_refused(tmp_path):
    train = write_rows(tmp_path / "t.csv", [{"text": f"t{i}", "score": i / 3} for i in range(6)])
    val = write_rows(tmp_path / "v.csv", [{"text": "a", "score": "high"}])
    with pytest.raises(UserError, match=r"data.validation \(.*v.csv\): data.label_column='score' must hold numbers"):
        load_classification_data(regression_config(train=str(train), validation=str(val)))


def test_label_names_are_a_config_problem_for_regression(tmp_path):
    path = write_rows(tmp_path / "t.csv", [{"text": f"t{i}", "score": i / 3} for i in range(6)])
    with pytest.raises(UserError, match=r"data.label_names=\['low', 'high'\]: a regression head has one output"):
        load_classification_data(regression_config(train=str(path), label_names=["low", "high"]))


def test_regression_head_has_one_output_and_pipeline_returns_its_raw_score(tiny_bert, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = load_classifier(cfg, [], tokenizer, task="regression")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    with torch.no_grad():
        model.classifier.bias.fill_(3.0)  # scores well outside (0, 1): a sigmoid would show
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    texts = ["the red apple", "a big bus", "my cat"]
    with torch.no_grad():
        logits = model.eval()(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]
    assert logits.abs().max() > 1
    outputs = pipeline("text-classification", model=str(tmp_path / "m"), device="cpu")(texts)
    assert [o["label"] for o in outputs] == ["score"] * 3
    assert [o["score"] for o in outputs] == pytest.approx(logits.tolist(), abs=1e-5)
    classifier = load_classifier(cfg, ["a", "b"], tokenizer)
    assert classifier.config.num_labels == 2 and classifier.config.problem_type is None


def test_regression_metrics_equal_scipy_and_scikit_learn():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=53).astype(np.float32)
    logits = (gold + rng.normal(scale=0.7, size=53)).astype(np.float32)[:, None]
    results = classification_metrics(Predictions(logits, gold), ["pearson", "spearman", "mse"])
    predicted = logits[:, 0].astype(np.float64)
    assert results["pearson"] == pytest.approx(stats.pearsonr(predicted, gold).statistic, abs=1e-12)
    assert results["spearman"] == pytest.approx(stats.spearmanr(predicted, gold).statistic, abs=1e-12)
    assert results["mse"] == pytest.approx(skm.mean_squared_error(gold, predicted), abs=1e-12)
    assert results["loss"] == pytest.approx(results["mse"], abs=1e-12)
    assert results["num_examples"] == 53
