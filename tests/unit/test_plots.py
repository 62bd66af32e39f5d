"""finetune.report.plots: the curves a run's metrics.jsonl gives, the PNGs, legend labels and `finetune-plot`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from finetune.report.plots import legend_labels, main, plot_run, plot_runs, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(step: int, loss: float, lr: float = 1e-3) -> dict:
    return {"step": step, "epoch": step / 10, "loss": loss, "lr": lr, "grad_norm": 0.5, "samples_per_s": 100.0}


def write_run(run_dir: Path, records: list[dict], config: dict | None = None, results: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    # json.dumps writes NaN/Infinity as the trainer's metrics.jsonl does.
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if results is not None:
        (run_dir / "eval_results.json").write_text(json.dumps(results))
    return run_dir


def add_best_checkpoint(run_dir: Path, step: int, progress: bool = True) -> None:
    step_dir = run_dir / "checkpoints" / f"step_{step:06d}"
    step_dir.mkdir(parents=True)
    if progress:
        (step_dir / "progress.json").write_text(json.dumps({"step": step, "metrics": {}}))
    (run_dir / "checkpoints" / "best").symlink_to(step_dir.name)


# Accuracy peaks at step 20, loss bottoms out at step 30: the two metrics pick different best steps.
EVALS = [
    {"step": 10, "eval_accuracy": 0.5, "eval_loss": 0.9, "eval_num_examples": 37, "eval_warning": "predicts one class"},
    {"step": 20, "eval_accuracy": 0.9, "eval_loss": 0.7, "eval_num_examples": 37},
    {"step": 30, "eval_accuracy": 0.8, "eval_loss": 0.6, "eval_num_examples": 37},
]
TRAINS = [train(5, 1.1, 1e-4), train(10, 1.0, 2e-4), train(20, 0.8, 1.5e-4), train(30, 0.5, 1e-4)]


def interleaved() -> list[dict]:
    return sorted(TRAINS + EVALS, key=lambda r: r["step"])  # sort is stable: training before eval at a step


def test_series_equal_metrics_jsonl(tmp_path):
    curves = read_curves(write_run(tmp_path / "run", interleaved()))
    # Panels: training loss and lr, then each numeric eval metric; strings, counts and other training keys left out.
    assert list(curves.series) == ["loss", "lr", "eval_accuracy", "eval_loss"]
    assert curves.series["loss"] == ([5, 10, 20, 30], [1.1, 1.0, 0.8, 0.5])
    assert curves.series["lr"] == ([5, 10, 20, 30], [1e-4, 2e-4, 1.5e-4, 1e-4])
    assert curves.series["eval_accuracy"] == ([10, 20, 30], [0.5, 0.9, 0.8])
    assert curves.series["eval_loss"] == ([10, 20, 30], [0.9, 0.7, 0.6])


@pytest.mark.parametrize(
    ("config", "results", "argument", "metric", "best"),
    [
        ({"eval": {"metric_for_best": "accuracy"}}, None, None, "accuracy", 20),  # higher is better, from config
        ({"eval": {"metric_for_best": "accuracy"}}, {"metric_for_best": "loss"}, None, "loss", 30),  # results first
        (None, {"metric_for_best": "accuracy"}, None, "accuracy", 20),
        ({"eval": {"metric_for_best": None}}, {}, None, "loss", 30),  # neither says: loss
        ({"eval": {"metric_for_best": "loss"}}, None, "eval_accuracy", "accuracy", 20),  # the argument wins
    ],
)
def test_best_evaluation_by_metric_for_best(tmp_path, config, results, argument, metric, best):
    curves = read_curves(write_run(tmp_path / "run", interleaved(), config, results), argument)
    assert (curves.metric_for_best, curves.best_step, curves.best_is_checkpoint) == (metric, best, False)


def test_best_evaluation_ties_go_to_the_earlier_step_and_skip_nonfinite(tmp_path):
    evals = [
        {"step": 10, "eval_loss": math.nan},
        {"step": 20, "eval_loss": 0.4},
        {"step": 30, "eval_loss": 0.4},
        {"step": 40, "eval_loss": -math.inf},
    ]
    curves = read_curves(write_run(tmp_path / "run", evals), "loss")
    assert curves.best_step == 20
    assert math.isnan(curves.series["eval_loss"][1][0])  # kept in the series: the plot shows a gap there


@pytest.mark.parametrize("progress", [True, False])  # without progress.json, the step_NNNNNN name tells the step
def test_best_checkpoint_link_wins_over_evaluations(tmp_path, progress):
    run_dir = write_run(tmp_path / "run", interleaved(), results={"metric_for_best": "loss"})
    add_best_checkpoint(run_dir, 10, progress)  # not the best eval_loss: the link is what the run kept
    curves = read_curves(run_dir)
    assert (curves.best_step, curves.best_is_checkpoint) == (10, True)


def test_repeated_steps_keep_the_last_record_of_each_kind(tmp_path):
    # A killed run that was not trimmed: steps 10 and 20 logged twice, the second time by the resumed run.
    records = [train(10, 1.0), train(20, 0.9), {"step": 20, "eval_loss": 0.95}, train(30, 0.8)]
    records += [train(20, 0.7), {"step": 20, "eval_loss": 0.75}, train(30, 0.6), train(10, 0.99)]
    curves = read_curves(write_run(tmp_path / "run", records))
    assert curves.series["loss"] == ([10, 20, 30], [0.99, 0.7, 0.6])
    assert curves.series["eval_loss"] == ([20], [0.75])


def test_odd_records_are_skipped(tmp_path):
    run_dir = write_run(tmp_path / "run", [train(10, 1.0)])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('["not", "a", "record"]\n{"step": "20", "loss": 0.5}\n{"step": true, "loss": 0.5}\n')
        f.write('{"step": 20, "loss": "high", "lr": 0.001, "early_stopping": {"patience_left": 2}}\n')
        f.write('{"step": 30, "eval_acc')  # half-written last line of a killed run
    curves = read_curves(run_dir)
    assert curves.series == {"loss": ([10], [1.0]), "lr": ([10, 20], [1e-3, 1e-3])}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas


def test_plot_run_writes_curves_png(tmp_path):
    run_dir = write_run(tmp_path / "run", interleaved(), results={"metric_for_best": "accuracy"})
    add_best_checkpoint(run_dir, 20)
    path = plot_run(run_dir)
    assert path == run_dir / "curves.png"
    assert_png(path)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # the temp file was renamed, not left


def test_plot_run_to_another_path(tmp_path):
    run_dir = write_run(tmp_path / "run", interleaved())
    out = tmp_path / "elsewhere.png"
    assert plot_run(run_dir, "accuracy", out) == out
    assert_png(out)
    assert not (run_dir / "curves.png").exists()


@pytest.mark.parametrize(
    "content",
    ["", "\n\n", '{"step": 5, "note": "only strings", "eval_warning": "no metric"}\n', "not json\n"],
)
def test_plot_run_with_nothing_to_plot_returns_none(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(content)
    (run_dir / "config.yaml").write_text(": not: yaml: [")
    assert plot_run(run_dir) is None
    assert not (run_dir / "curves.png").exists()


def test_plot_run_single_points_and_nan(tmp_path):
    # One training record and one eval, a NaN loss: still a plot, no crash.
    records = [train(1, math.nan), {"step": 1, "eval_loss": math.inf, "eval_accuracy": 1}]
    assert_png(plot_run(write_run(tmp_path / "run", records)))


def test_plot_run_missing_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path / "absent")


def config(lr: float, lora: bool, out: str) -> dict:
    return {
        "train": {"lr": lr, "epochs": 3},
        "lora": {"enabled": lora, "target_modules": ["all-linear"]},
        "output": {"dir": out},
    }


def test_legend_labels_from_differing_keys(tmp_path):
    a = write_run(tmp_path / "a", [], config(3e-5, True, "/runs/a"))
    b = write_run(tmp_path / "b", [], config(1e-4, True, "/runs/b"))
    c = write_run(tmp_path / "c", [], config(1e-4, False, "/runs/c"))
    assert legend_labels([a, b, c]) == [
        "train.lr=3e-05, lora.enabled=true",
        "train.lr=0.0001, lora.enabled=true",
        "train.lr=0.0001, lora.enabled=false",
    ]
    assert legend_labels([a, b]) == ["train.lr=3e-05", "train.lr=0.0001"]
    no_lora = write_run(tmp_path / "no_lora", [], {"train": {"lr": 3e-5, "epochs": 3}})
    assert legend_labels([a, no_lora]) == [
        'lora.enabled=true, lora.target_modules=["all-linear"]',
        "lora.enabled=(absent), lora.target_modules=(absent)",
    ]


def test_legend_labels_fall_back_to_dir_names(tmp_path):
    a = write_run(tmp_path / "a", [], config(3e-5, True, "/runs/a"))
    b = write_run(tmp_path / "b", [], config(3e-5, True, "/runs/b"))  # differs only under output.*
    assert legend_labels([a, b]) == ["a", "b"]
    c = write_run(tmp_path / "c", [], config(1e-4, True, "/runs/c"))
    d = write_run(tmp_path / "d", [])  # no config.yaml
    assert legend_labels([a, c, d]) == ["train.lr=3e-05", "train.lr=0.0001", "d"]


def test_plot_runs_overlays_runs(tmp_path):
    a = write_run(tmp_path / "a", interleaved(), config(3e-5, True, "a"))
    b = write_run(tmp_path / "b", [train(5, 2.0), train(15, 1.5)], config(1e-4, True, "b"))
    empty = write_run(tmp_path / "empty", [])
    out = tmp_path / "cmp.png"
    assert plot_runs([a, b, empty], out) == out
    assert_png(out)


def test_cli_compares_two_runs(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", interleaved(), config(3e-5, True, "a"))
    b = write_run(tmp_path / "b", interleaved(), config(1e-4, True, "b"))
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b)]) == 0
    assert_png(tmp_path / "curves-compare.png")
    assert capsys.readouterr().out.strip() == "curves-compare.png"
    assert main([str(a), str(b), "-o", str(tmp_path / "x.png")]) == 0
    assert_png(tmp_path / "x.png")


def test_cli_one_run_writes_curves_png(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", interleaved())
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "curves.png")
    assert_png(run_dir / "curves.png")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "is not a directory"),  # absent
        (lambda p: p.write_text("x"), "is not a directory"),  # a file
        (lambda p: p.mkdir(), "has no metrics.jsonl"),
        (lambda p: write_run(p, []), "nothing to plot"),
    ],
    ids=["absent", "file", "no-metrics", "empty-metrics"],
)
def test_cli_bad_run_dir_exits_2_naming_it(tmp_path, capsys, make, expected):
    good = write_run(tmp_path / "good", interleaved())
    bad = tmp_path / "bad"
    make(bad)
    argv = [str(bad)] if expected == "nothing to plot" else [str(good), str(bad)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err and "Traceback" not in err


def test_cli_out_in_a_missing_dir_exits_2(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", interleaved())
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "-o", str(tmp_path / "absent" / "x.png")])
    assert exit_info.value.code == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err


def test_cli_help_says_what_it_writes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "curves.png" in capsys.readouterr().out
