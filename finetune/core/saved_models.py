"""The models a run saves, as finetune-eval finds them: final/, each checkpoint's model/, or one exported dir, as a
full transformers model or a peft adapter; and what a scorer hands back for the leaderboard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.core.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class ModelToScore:
    name: str  # "final", "step_000100"
    path: Path  # a dir save_pretrained wrote: a transformers model or a peft adapter
    step: int | None


def is_full_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def is_adapter_dir(path: Path) -> bool:
    """A peft adapter (a LoRA run's checkpoint): adapter config and weights, the base model named inside."""
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def is_model_dir(path: Path) -> bool:
    return is_full_model_dir(path) or is_adapter_dir(path)


def find_models(path: Path) -> tuple[list[ModelToScore], Path | None]:
    """The models `path` names, in step order, and the run dir they belong to (if any)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory.")
    if is_model_dir(path):
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return [ModelToScore(path.name, path, None)], run_dir
    if is_model_dir(path / "model"):  # a training checkpoint: checkpoints/step_N/model
        step = int(path.name.rsplit("_", 1)[-1]) if path.name.startswith("step_") else None
        run_dir = path.parents[1] if (path.parents[1] / "config.yaml").is_file() else None
        return [ModelToScore(path.name, path / "model", step)], run_dir
    if (path / "config.yaml").is_file():  # a run's output dir
        checkpoints = sorted((path / "checkpoints").glob("step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
        models = [
            ModelToScore(c.name, c / "model", int(c.name.rsplit("_", 1)[-1]))
            for c in checkpoints
            if is_model_dir(c / "model")
        ]
        if is_model_dir(path / "final"):
            results = path / "eval_results.json"
            step = json.loads(results.read_text()).get("step") if results.is_file() else None
            models.append(ModelToScore("final", path / "final", step))
        if models:
            return models, path
        raise UserError(f"{path} is a run dir (config.yaml) but holds no finished model: no final/ and no checkpoints.")
    raise UserError(
        f"{path} is not a model, a checkpoint or a run: expected config.json and model.safetensors inside "
        f"(an exported model such as final/) or {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a peft adapter), "
        "a model/ sub-dir (a checkpoint), or config.yaml (a run's output dir)."
    )


def is_whole_run(path: Path, run_dir: Path | None) -> bool:
    """`path` names a run dir (every model in it: one results sub-dir per model, and a leaderboard), not one of its
    models."""
    return run_dir is not None and path.resolve() == run_dir.resolve()


def results_dir(path: Path, output_dir: str | None) -> Path:
    """Where the results of scoring `path` go: output.dir, else <path>/eval."""
    return Path(output_dir) if output_dir else path / "eval"


@dataclass
class ScoredModels:
    """What a scorer hands finetune-eval's entry for the leaderboard of a run."""

    rows: list[dict]  # {"model": name, **eval_results} per scored model; on the main process only
    metric_for_best: str  # the metric that ranks them
    columns: list[str]  # the leaderboard's columns, "best" last
    dir: Path  # where leaderboard.json / .csv go


def format_scores(results: dict, keys) -> str:
    """`key=value` of the `keys` present in `results`, floats to 4 places: a model's line on stdout."""
    shown = {k: results[k] for k in keys if k in results}
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
