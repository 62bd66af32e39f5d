"""Metrics as Hugging Face `evaluate` modules that work offline.

`evaluate.load("accuracy")` fetches the metric's script from the Hub, and the `evaluate` wheel ships no
metrics, so offline it fails. These are `evaluate.Metric` subclasses computed by scikit-learn / SciPy:
the same `add_batch` / `compute` API, no network. `load_metric(name)` returns one of them by name, and
falls back to `evaluate.load(name)` (Hub, needs network) for any other name.

Names: accuracy; precision, recall, f1 with an average suffix (`f1_macro`, `precision_micro`,
`recall_weighted`; bare `f1` = macro); matthews_correlation; and for a regression head pearson, spearman, mse.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy import stats
from sklearn import metrics as skm

from finetune.core import metric_names as names
from finetune.core.errors import UserError, first_line
from finetune.core.metric_names import (  # noqa: F401  (the names, re-exported for callers that evaluate anyway)
    AVERAGES,
    LOWER_IS_BETTER,
    available_metrics,
    check_metric_names,
    default_metrics,
    is_regression_metric,
)

_CLASS_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_FLOAT_FEATURES = datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")})


class _OfflineMetric(evaluate.Metric):
    """An evaluate.Metric computed locally by `_score(predictions, references)`."""

    description = ""
    features = _CLASS_FEATURES

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.description,
            citation="scikit-learn / SciPy",
            inputs_description="predictions and references, one per example",
            features=self.features,
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {self.name: float(self._score(np.asarray(predictions), np.asarray(references)))}


class Accuracy(_OfflineMetric):
    description = "Share of predictions equal to the reference label."

    def _score(self, predictions, references):
        return skm.accuracy_score(references, predictions)


class _Averaged(_OfflineMetric):
    """precision / recall / F1 with an averaging over classes: micro, macro or weighted."""

    function = None

    def __init__(self, average: str = "macro", **kwargs):
        self.average = average
        super().__init__(config_name=average, **kwargs)

    def _score(self, predictions, references):
        return type(self).function(references, predictions, average=self.average, zero_division=0)


class Precision(_Averaged):
    description = "Precision averaged over classes."
    function = staticmethod(skm.precision_score)


class Recall(_Averaged):
    description = "Recall averaged over classes."
    function = staticmethod(skm.recall_score)


class F1(_Averaged):
    description = "F1 averaged over classes."
    function = staticmethod(skm.f1_score)


class MatthewsCorrelation(_OfflineMetric):
    description = "Matthews correlation coefficient (multi-class form)."

    def _score(self, predictions, references):
        return skm.matthews_corrcoef(references, predictions)


class Pearson(_OfflineMetric):
    description = "Pearson correlation of predicted and reference scores."
    features = _FLOAT_FEATURES

    def _score(self, predictions, references):
        return stats.pearsonr(predictions, references).statistic


class Spearman(_OfflineMetric):
    description = "Spearman rank correlation of predicted and reference scores."
    features = _FLOAT_FEATURES

    def _score(self, predictions, references):
        return stats.spearmanr(predictions, references).statistic


class MeanSquaredError(_OfflineMetric):
    description = "Mean squared error of predicted scores."
    features = _FLOAT_FEATURES

    def _score(self, predictions, references):
        return skm.mean_squared_error(references, predictions)


CLASSIFICATION = {"accuracy": Accuracy, "matthews_correlation": MatthewsCorrelation}
AVERAGED = {"precision": Precision, "recall": Recall, "f1": F1}
REGRESSION = {"pearson": Pearson, "spearman": Spearman, "mse": MeanSquaredError}
assert (tuple(CLASSIFICATION), tuple(AVERAGED), tuple(REGRESSION)) == (
    names.CLASSIFICATION,
    names.AVERAGED,
    names.REGRESSION,
)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """The offline metric called `name`, or else the Hub metric of that name (needs network)."""
    # keep_in_memory: no cache files, so every process can compute on its gathered predictions at once.
    if name in CLASSIFICATION:
        return CLASSIFICATION[name](keep_in_memory=True)
    if name in REGRESSION:
        return REGRESSION[name](keep_in_memory=True)
    base, _, average = name.rpartition("_") if name.rsplit("_", 1)[-1] in AVERAGES else (name, "", "macro")
    if base in AVERAGED:
        return AVERAGED[base](average=average, keep_in_memory=True)
    try:
        return evaluate.load(name, keep_in_memory=True)
    except Exception as err:  # network, unknown name: evaluate raises many types
        raise UserError(
            f"unknown metric {name!r}: offline metrics are {', '.join(available_metrics())}. "
            f"Other names are loaded from the Hugging Face Hub, which needs network ({first_line(err)})."
        ) from None
