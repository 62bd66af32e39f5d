"""The names of the offline metrics and what they mean for training: which exist, which are the defaults, which
are lower-is-better. Light on purpose: config checks and checkpoint bookkeeping need these at start, while the
metrics themselves (`finetune.classify.metrics`: evaluate, datasets, scikit-learn, seconds to import) are needed only
when a model is first evaluated."""

from __future__ import annotations

from finetune.core.errors import UserError

AVERAGES = ("micro", "macro", "weighted")
CLASSIFICATION = ("accuracy", "matthews_correlation")
AVERAGED = ("precision", "recall", "f1")  # with an average suffix: f1_macro; bare = macro
REGRESSION = ("pearson", "spearman", "mse")
LOWER_IS_BETTER = {"mse", "loss", "perplexity"}


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
