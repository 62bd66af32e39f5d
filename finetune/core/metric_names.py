"""The names of the offline metrics and what they mean for training: which exist, which are the defaults, which
are lower-is-better. Light on purpose: config checks and checkpoint bookkeeping need these at start, while the
metrics themselves (`finetune.classify.metrics`: evaluate, datasets, scikit-learn, seconds to import) are needed only
when a model is first evaluated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.core.errors import UserError

AVERAGES = ("micro", "macro", "weighted")
CLASSIFICATION = ("accuracy", "matthews_correlation")
AVERAGED = ("precision", "recall", "f1")  # with an average suffix: f1_macro; bare = macro
REGRESSION = ("pearson", "spearman", "mse")
LOWER_IS_BETTER = {"mse", "loss", "perplexity", "rewards/rejected", "logps/rejected"}  # the last two: DPO


def available_metrics() -> list[str]:
    averaged = [f"{name}_{avg}" for name in AVERAGED for avg in AVERAGES]
    return [*CLASSIFICATION, *AVERAGED, *averaged, *REGRESSION]


def default_metrics(regression: bool) -> list[str]:
    """What training and finetune-eval report when eval.metrics is not set."""
    return ["pearson", "spearman", "mse"] if regression else ["accuracy", "f1_macro"]


def is_regression_metric(name: str) -> bool:
    return name in REGRESSION


def check_metric_names(names: list[str], regression: bool, key: str = "eval.metrics") -> None:
    """Names must be offline metrics of the right kind (classification or regression); before any work."""
    known = set(available_metrics())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"{key}: unknown metric(s) {unknown}; offline metrics are {', '.join(available_metrics())}. "
            "Hub metrics (evaluate.load) need network and are not used in training."
        )
    wrong = [n for n in names if is_regression_metric(n) != regression]
    if wrong:
        kind = "regression (1 output)" if regression else "classification"
        raise UserError(f"{key}: {wrong} do not apply to a {kind} model.")


@dataclass(frozen=True)
class MetricGoal:
    """What "better" means for one metric, the one rule early stopping, checkpoint pruning, the leaderboard and
    the plots share: its direction (`LOWER_IS_BETTER`), a minimum improvement, ties to the earlier value (as
    Trainer's best-model tracking), and a value that is not a finite number (a NaN loss, the correlation of a
    constant prediction) never better than a number: last in a ranking."""

    metric: str  # without the eval_ prefix: accuracy, loss, ...
    min_delta: float = 0.0

    @classmethod
    def of(cls, metric: str, min_delta: float = 0.0) -> MetricGoal:
        return cls(metric.removeprefix("eval_"), min_delta)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def value(self, metrics: dict | None) -> float | None:
        """The metric's value in `metrics` as a float, or None when absent or not finite."""
        value = (metrics or {}).get(self.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def better(self, value: float | None, than: float | None) -> bool:
        """`value` beats `than`: anything finite beats None or a non-finite value; a tie is no improvement, so
        the earlier value stays the best."""
        return self._gain(value, than) > 0.0

    def improves(self, value: float | None, than: float | None) -> bool:
        """`value` beats `than` by more than `min_delta` (early stopping's patience counts the evaluations that
        do not)."""
        return self._gain(value, than) > self.min_delta

    def _gain(self, value: float | None, than: float | None) -> float:
        if value is None or not math.isfinite(value):
            return -math.inf
        if than is None or not math.isfinite(than):
            return math.inf
        return than - value if self.lower_is_better else value - than

    def sort_key(self, value: float | None) -> tuple[bool, float]:
        """Ascending key: best first, non-finite last; a stable sort keeps ties in their given (earlier) order."""
        if value is None or not math.isfinite(value):
            return (True, 0.0)
        return (False, value if self.lower_is_better else -value)

    def best(self, items: list, value) -> object | None:
        """The best of `items` by `value(item)` (earliest on a tie), or None when none has a finite value."""
        ranked = sorted(items, key=lambda item: self.sort_key(value(item)))
        return ranked[0] if ranked and not self.sort_key(value(ranked[0]))[0] else None
