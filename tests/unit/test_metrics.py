"""Offline metrics: evaluate modules whose numbers equal scikit-learn's / SciPy's."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from finetune.classify.metrics import available_metrics, check_metric_names, load_metric
from finetune.core.errors import UserError

rng = np.random.default_rng(0)
REFERENCES = rng.integers(0, 4, size=203)
PREDICTIONS = np.where(rng.random(203) < 0.7, REFERENCES, rng.integers(0, 4, size=203))
SCORES = rng.normal(size=101)
PREDICTED_SCORES = SCORES + rng.normal(scale=0.5, size=101)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accuracy", skm.accuracy_score(REFERENCES, PREDICTIONS)),
        ("f1", skm.f1_score(REFERENCES, PREDICTIONS, average="macro")),
        ("f1_micro", skm.f1_score(REFERENCES, PREDICTIONS, average="micro")),
        ("f1_macro", skm.f1_score(REFERENCES, PREDICTIONS, average="macro")),
        ("f1_weighted", skm.f1_score(REFERENCES, PREDICTIONS, average="weighted")),
        ("precision_macro", skm.precision_score(REFERENCES, PREDICTIONS, average="macro")),
        ("precision_weighted", skm.precision_score(REFERENCES, PREDICTIONS, average="weighted")),
        ("recall_micro", skm.recall_score(REFERENCES, PREDICTIONS, average="micro")),
        ("recall_macro", skm.recall_score(REFERENCES, PREDICTIONS, average="macro")),
        ("matthews_correlation", skm.matthews_corrcoef(REFERENCES, PREDICTIONS)),
    ],
)
def test_classification_metrics_equal_scikit_learn(name, expected):
    metric = load_metric(name)
    assert isinstance(metric, evaluate.EvaluationModule)
    # Fed in batches, as an evaluation loop does.
    for start in range(0, 203, 50):
        metric.add_batch(predictions=PREDICTIONS[start : start + 50], references=REFERENCES[start : start + 50])
    (value,) = metric.compute().values()
    assert value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pearson", stats.pearsonr(PREDICTED_SCORES, SCORES).statistic),
        ("spearman", stats.spearmanr(PREDICTED_SCORES, SCORES).statistic),
        ("mse", skm.mean_squared_error(SCORES, PREDICTED_SCORES)),
    ],
)
def test_regression_metrics_equal_scipy_and_scikit_learn(name, expected):
    (value,) = load_metric(name).compute(predictions=PREDICTED_SCORES, references=SCORES).values()
    assert value == pytest.approx(expected, abs=1e-12)


def test_unknown_metric_lists_the_offline_ones_and_says_the_hub_needs_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_metric("bleurt_but_not_really")
    assert "offline metrics are accuracy" in str(err.value) and "needs network" in str(err.value)


def test_metric_names_are_checked_for_the_kind_of_model():
    check_metric_names(["accuracy", "f1_weighted"], regression=False)
    check_metric_names(["pearson", "mse"], regression=True)
    with pytest.raises(UserError, match="unknown metric\\(s\\) \\['acuracy'\\]"):
        check_metric_names(["acuracy"], regression=False)
    with pytest.raises(UserError, match="do not apply to a regression"):
        check_metric_names(["accuracy"], regression=True)
    assert len(available_metrics()) == len(set(available_metrics()))
