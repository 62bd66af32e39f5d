"""Training curves of a run (`<run>/curves.png`), and `finetune-plot` to draw one run or overlay several.

A run's `metrics.jsonl` holds training records (loss, lr, ...) and eval records (`eval_<metric>` keys) by
optimizer step. Each panel is one series: training loss, learning rate, then every numeric eval metric; eval
points carry markers, and a dotted line marks the best checkpoint (`checkpoints/best`) or, for a run without
checkpoints, the best evaluation by the metric for best.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from finetune.core.errors import UserError, exit_on_user_error
from finetune.core.metric_names import MetricGoal
from finetune.core.run_dir import RunDir

TRAIN_SERIES = ("loss", "lr")  # the training panels, in this order
TITLES = {"loss": "training loss", "lr": "learning rate"}
NOT_METRICS = {"eval_num_examples"}  # numeric bookkeeping, not a curve worth a panel


@dataclass
class Curves:
    """What the plot of one run draws: series by panel name ("loss", "lr", "eval_<metric>") as (steps, values)."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    metric_for_best: str | None = "loss"  # without eval_; None: the run did not record the one its checkpoints used
    best_step: int | None = None
    best_is_checkpoint: bool = False  # True: from checkpoints/best; False: the best evaluation


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _load(path: Path, parse) -> dict:
    """A dict from a JSON/YAML file, or {} when it is absent or unreadable (plotting must not fail on it)."""
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, the last one per (step, kind) in step order; bad lines skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    latest: dict[tuple[int, bool], dict] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # e.g. the half-written last line of a killed run
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        is_eval = any(key.startswith("eval_") for key in record)
        latest.pop((step, is_eval), None)  # re-insert, so a repeated step takes the later record's place
        latest[(step, is_eval)] = record
    return sorted(latest.values(), key=lambda record: record["step"])


def resolve_metric_for_best(run_dir: Path) -> str | None:
    """eval_results.json's metric_for_best, else the config's eval.metric_for_best, else None (not recorded)."""
    name = _load(RunDir(run_dir).eval_results, json.loads).get("metric_for_best")
    if not isinstance(name, str) or not name:
        name = (_load(RunDir(run_dir).config, yaml.safe_load).get("eval") or {}).get("metric_for_best")
    return name.removeprefix("eval_") if isinstance(name, str) and name else None


def checkpoint_best_step(run_dir: Path) -> int | None:
    """The step of the checkpoint that `checkpoints/best` points to, or None without one."""
    link = RunDir(run_dir).best
    if not link.is_dir():
        return None
    step = _load(link / "progress.json", json.loads).get("step")
    if _is_number(step):
        return int(step)
    name = link.resolve().name  # progress.json unreadable: step_NNNNNN names the step too
    return int(name.removeprefix("step_")) if name.removeprefix("step_").isdigit() else None


def read_curves(run_dir: Path, metric_for_best: str | None = None) -> Curves:
    """The series and the best step that `plot_run` draws for `run_dir`."""
    metric = metric_for_best.removeprefix("eval_") if metric_for_best else resolve_metric_for_best(run_dir)
    curves = Curves(metric_for_best=metric)  # None stays only when checkpoints/best names the best step
    for record in read_records(run_dir / RunDir.METRICS):
        is_eval = any(key.startswith("eval_") for key in record)
        for key, value in record.items():
            wanted = key.startswith("eval_") and key not in NOT_METRICS if is_eval else key in TRAIN_SERIES
            if wanted and _is_number(value):
                steps, values = curves.series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    # Training panels first, in a fixed order; eval panels in the order they first appear.
    order = [name for name in TRAIN_SERIES if name in curves.series]
    curves.series = {name: curves.series[name] for name in order + [n for n in curves.series if n not in order]}
    curves.best_step = checkpoint_best_step(run_dir)
    curves.best_is_checkpoint = curves.best_step is not None
    if curves.best_step is None:
        curves.metric_for_best = metric = metric or "loss"
        steps, values = curves.series.get(f"eval_{metric}", ([], []))
        by_step = dict(zip(steps, values, strict=True))
        curves.best_step = MetricGoal.of(metric).best(steps, by_step.get)  # the rule checkpoint selection uses
    return curves


def _render(runs: list[tuple[str, Curves]], title: str, out: Path) -> Path:
    """Draw the runs' curves, one colour per run, into a PNG at `out`, written atomically."""
    names = list(dict.fromkeys(name for _, curves in runs for name in curves.series))
    ncols = 1 if len(names) == 1 else 2
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 2.6 * nrows + 1.0 + 0.25 * len(runs)), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.remove()
    best_metric = {f"eval_{curves.metric_for_best}" for _, curves in runs}
    for i, (ax, name) in enumerate(zip(axes, names, strict=False)):
        ax.set_title(TITLES.get(name, name) + (" (metric for best)" if name in best_metric else ""), fontsize=10)
        ax.grid(alpha=0.3)
        if i + ncols >= len(names):  # the lowest panel of its column carries the shared x axis
            ax.set_xlabel("optimizer step")
            ax.tick_params(labelbottom=True)
        positive, finite = True, []
        for j, (_, curves) in enumerate(runs):
            colour = f"C{j % 10}"
            if name in curves.series:
                steps, values = curves.series[name]
                shown = [v if math.isfinite(v) else math.nan for v in values]  # NaN/inf: a gap in the line
                marker = "o" if name.startswith("eval_") or len(steps) == 1 else None
                ax.plot(steps, shown, color=colour, marker=marker, markersize=3, linewidth=1.2)
                positive &= all(v > 0 for v in shown if math.isfinite(v))
                finite += [v for v in shown if math.isfinite(v)]
                if curves.best_step in steps and name == f"eval_{curves.metric_for_best}":
                    ax.plot(curves.best_step, shown[steps.index(curves.best_step)], "*", color=colour, markersize=10)
            if curves.best_step is not None:
                ax.axvline(curves.best_step, color=colour, linestyle=":", linewidth=1)
        # log scale only where the loss spans a decade: a narrow range reads better linear
        if name == "loss" and positive and finite and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
    handles = [Line2D([], [], color=f"C{j % 10}", label=label) for j, (label, _) in enumerate(runs)]
    handles += [
        Line2D([], [], color="grey", marker="o", markersize=3, linestyle="none", label="evaluation"),
        Line2D([], [], color="grey", linestyle=":", label="best checkpoint (or best evaluation, without checkpoints)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", fontsize="small", ncols=1)
    fig.suptitle(title, fontsize=11)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)  # never a half-written PNG where a reader looks
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def plot_run(run_dir: Path, metric_for_best: str | None = None, out: Path | None = None) -> Path | None:
    """Write <run_dir>/curves.png (or `out`): training loss, learning rate, and every numeric eval metric against the
    optimizer step; eval points marked; the best checkpoint (or, without checkpoints, the best evaluation by
    metric_for_best) marked. Returns the path, or None when metrics.jsonl has no records (nothing to plot)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run dir at {run_dir}")
    curves = read_curves(run_dir, metric_for_best)
    if not curves.series:
        return None
    name = title = run_dir.resolve().name
    if curves.best_step is not None:
        title += f" - best {'checkpoint' if curves.best_is_checkpoint else 'evaluation'}: step {curves.best_step}"
    if curves.best_step is not None and curves.metric_for_best:  # None: the run did not record which metric
        order = "lower" if MetricGoal.of(curves.metric_for_best).lower_is_better else "higher"
        title += f" by eval_{curves.metric_for_best} ({order} is better)"
    return _render([(name, curves)], title, Path(out) if out else RunDir(run_dir).curves)


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value) -> str:
    if isinstance(value, bool) or value is None:  # YAML spelling, as in config.yaml
        return {True: "true", False: "false", None: "null"}[value]
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def legend_labels(run_dirs: list[Path]) -> list[str]:
    """One label per run: the config keys whose values differ between the runs (output.* aside), as
    'train.lr=3e-05, lora.enabled=true'; the dir name for a run without config.yaml or when no key differs."""
    configs = [_flatten(_load(RunDir(d).config, yaml.safe_load)) for d in run_dirs]
    with_config = [c for c in configs if c]
    keys = list(dict.fromkeys(key for c in with_config for key in c if key.split(".")[0] != "output"))
    # JSON text compares lists and dicts too; [present, value] so a key one run lacks differs from any value.
    differ = [k for k in keys if len({json.dumps([k in c, c.get(k)], default=str) for c in with_config}) > 1]
    labels = [
        ", ".join(f"{k}={_show(c[k]) if k in c else '(absent)'}" for k in differ)
        if c and differ
        else Path(d).resolve().name
        for d, c in zip(run_dirs, configs, strict=True)
    ]
    # Two runs could still share a label (same dir name in two places): the paths as given tell them apart.
    return labels if len(set(labels)) == len(labels) else [str(d) for d in run_dirs]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Overlay several runs in one figure, same panels, one colour per run, legend labels from the config keys whose
    values differ between the runs (e.g. 'train.lr=3e-05, lora.enabled=true'); fall back to the dir name when no keys
    differ or a run has no config.yaml. Ignore keys under output.* when finding differences."""
    runs = [(label, read_curves(Path(d))) for label, d in zip(legend_labels(run_dirs), run_dirs, strict=True)]
    runs = [(label, curves) for label, curves in runs if curves.series]  # a run that has logged nothing yet
    if not runs:
        raise UserError(
            f"nothing to plot: no numeric records in {', '.join(str(Path(d) / RunDir.METRICS) for d in run_dirs)}."
        )
    return _render(runs, f"{len(runs)} runs", Path(out))


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-plot",
        description="Plot a run's training curves (training loss, learning rate, every eval metric by optimizer step, "
        "best checkpoint marked) to RUN_DIR/curves.png, or overlay several runs in one figure (curves-compare.png), "
        "labelled by the config keys that differ between them.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's output dir")
    parser.add_argument(
        "-o", "--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png for one run, curves-compare.png here)"
    )
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a directory: pass a run's output dir (output.dir in its config.yaml).")
        if not (run_dir / RunDir.METRICS).is_file():
            raise UserError(
                f"{run_dir} has no {RunDir.METRICS}: pass a run's output dir (written from its first step)."
            )
    if args.out is not None and not args.out.parent.is_dir():
        raise UserError(f"{args.out.parent} is not a directory: create it, or pass -o a path in an existing dir.")
    if len(args.run_dirs) == 1:
        path = plot_run(args.run_dirs[0], out=args.out)
        if path is None:
            raise UserError(f"nothing to plot: {args.run_dirs[0] / RunDir.METRICS} has no numbers yet; rerun later.")
    else:
        path = plot_runs(args.run_dirs, args.out or Path("curves-compare.png"))
    print(path)
    return 0
