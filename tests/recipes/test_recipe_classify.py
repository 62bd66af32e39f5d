"""recipes/classify.py end to end: through `accelerate launch` as users run it, and its bad-input paths."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    CLASSIFY,
    REPO,
    assert_tensorboard_matches_metrics_log,
    keyword_rows,
    launch,
    read_jsonl,
    recipe_main,
    run_bad,
    toy_args,
    write_rows,
)


@pytest.fixture(scope="module")
def finished_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = launch(CLASSIFY, toy_args(tiny_bert, toy_data, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_run_writes_every_output(finished_run: Path):
    final = finished_run / "final"
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert not list(finished_run.glob(".tmp-*")), "a temporary save dir was left behind"
    assert not list(final.glob("*.bin")), "weights must be safetensors"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "fruit", "2": "vehicle"}
    results = json.loads((finished_run / "eval_results.json").read_text())
    assert results["num_examples"] == 37
    assert results["step"] == 8 * 15  # 240 examples / 8 per micro-batch / 2 accumulation = 15 steps per epoch


def test_the_time_to_the_first_step_is_reported_by_part(finished_run: Path):
    results = json.loads((finished_run / "eval_results.json").read_text())
    startup = results["startup_s"]
    assert list(startup) == ["total", "imports", "setup", "model", "data", "first_step"]
    assert all(seconds >= 0 for seconds in startup.values())
    assert sum(startup.values()) - startup["total"] == pytest.approx(startup["total"], abs=0.01)
    assert startup["imports"] > 0.5, "process start is the OS's, before Python imported anything"
    assert startup["total"] < results["wall_time_s"]


def test_training_loss_fell_and_metrics_are_logged(finished_run: Path):
    records = read_jsonl(finished_run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in train] == list(range(5, 121, 5))
    assert train[-1]["loss"] < 0.5 * train[0]["loss"], [r["loss"] for r in train]
    assert all(r["samples_per_s"] > 0 and r["lr"] >= 0 for r in train)
    assert [r["step"] for r in evals] == [20, 40, 60, 80, 100, 120]
    assert evals[-1]["eval_accuracy"] > 0.9
    assert 0 <= evals[-1]["eval_f1_macro"] <= 1


def test_trackers_get_every_metric_and_the_config(finished_run: Path):
    """TensorBoard is installed with the test extra, so the default logging.trackers (null) uses it: every
    scalar of metrics.jsonl is in the event files at its step, and the config is logged as hyperparameters."""
    assert_tensorboard_matches_metrics_log(finished_run)
    hparams = list((finished_run / "logs" / "finetune").glob("*/hparams.yml"))
    assert hparams and yaml.safe_load(hparams[0].read_text())["train.lr"] == 3e-3


def test_curves_are_drawn(finished_run: Path):
    from matplotlib.image import imread

    image = imread(finished_run / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert len(set(image.reshape(-1, image.shape[-1])[:, 0].tolist())) > 10, "an empty canvas"


def test_final_model_loads_in_pipeline_with_label_names(finished_run: Path):
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(finished_run / "final"), device="cpu")
    predictions = classifier(["the big red apple", "a very old bus", "my cat is on the cow"])
    assert [p["label"] for p in predictions] == ["fruit", "vehicle", "animal"]


def test_the_model_cards_command_reproduces_the_run(finished_run: Path, tmp_path):
    """final/README.md is a Hugging Face model card; the command it gives trains the same model again."""
    from huggingface_hub import ModelCard

    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["output"]["dir"] == str(finished_run)
    card = ModelCard.load(finished_run / "final" / "README.md")
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
    assert "accuracy" in card.data.metrics and "finetune" in card.data.tags
    assert card.data.base_model is None, "a local model path is no Hub id: it goes in the text, not base_model"
    results = json.loads((finished_run / "eval_results.json").read_text())
    for text in ("240 examples", "37 examples", "Effective batch 16", f"{results['accuracy']:.4g}", "animal"):
        assert text in card.text, text
    command = shlex.split(re.search(r"```bash\n(accelerate launch .*)\n```", card.text).group(1))
    script = command.index("recipes/classify.py")
    rerun_dir = tmp_path / "rerun"
    args = [a if not a.startswith("output.dir=") else f"output.dir={rerun_dir}" for a in command[script + 1 :]]
    assert args[:2] == ["--config", str(finished_run / "config.yaml")]
    result = launch(CLASSIFY, args)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((finished_run / "eval_results.json").read_text())
    again = json.loads((rerun_dir / "eval_results.json").read_text())
    run_stats = (
        "overhead",
        "train_runtime_s",
        "train_samples_per_s",
        "train_tokens_per_s",
        "memory_mb",
        "wall_time_s",
        "startup_s",
    )
    assert {k: v for k, v in again.items() if k not in run_stats} == {
        k: v for k, v in first.items() if k not in run_stats
    }
    assert again["train_samples_per_s"] > 0 and again["memory_mb"]["peak"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the key or file, no traceback, nothing written.
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_exit_2_before_writing(tiny_bert, toy_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = toy_args(tiny_bert, toy_data, out)
    no_text = write_rows(tmp_path / "no_text.csv", [{"sentence": "a", "label": "x"}] * 5)
    unseen = write_rows(tmp_path / "unseen.csv", [{"text": "the red apple", "label": "mineral"}])
    empty = write_rows(tmp_path / "empty.jsonl", [{"text": " ", "label": "x"}])
    one_class = write_rows(tmp_path / "one_class.csv", keyword_rows(20, labels=["fruit"]))
    cases = {
        "trian.epochs=1": "trian.epochs (command line): unknown key; did you mean `train.epochs`?",
        f"data.train={tmp_path / 'missing.csv'}": f"data.train: file or folder not found: {tmp_path / 'missing.csv'}",
        f"data.train={no_text}": "data.text_column='text' not found; the columns are: sentence, label",
        f"data.validation={unseen}": "label(s) never seen in training: 'mineral' (1x)",
        f"data.train={empty}": "no examples left after dropping rows with empty text",
        "data.max_length=512": "data.max_length=512 is above the model's limit of 64 tokens",
        "train.lr_scheduler=cosin": "train.lr_scheduler (command line): expected one of linear, cosine, constant",
        "eval.metrics=[accuracy,acuracy]": "eval.metrics: unknown metric(s) ['acuracy']; offline metrics are",
        f"data.train={one_class}": "every training example has label 'fruit'; a classifier needs at least 2 classes",
        "logging.trackers=[tensorbord]": "logging.trackers: unknown tracker(s) tensorbord; choose from tensorboard,",
        "logging.trackers=[swanlab]": "logging.trackers lists swanlab, not installed here (swanlab: install swanlab)",
    }
    for override, message in cases.items():
        assert message in run_bad([*base, override], capsys), override
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    err = run_bad([*base, "train.mixed_precision=bf16"], capsys)
    assert "train.mixed_precision=bf16 (recipe config) conflicts with mixed precision 'no' from the launcher" in err
    err = run_bad([*base, "eval.every_n_steps=null", "train.early_stopping_patience=3"], capsys)
    assert "train.early_stopping_patience=3 needs evaluations during training: set eval.every_n_steps" in err
    assert not out.exists(), "bad input must not leave an output dir behind"


def test_refuses_a_finished_run_unless_overwrite(finished_run: Path, tiny_bert, toy_data, capsys):
    before = (finished_run / "eval_results.json").read_text()
    err = run_bad(toy_args(tiny_bert, toy_data, finished_run), capsys)
    assert f"output.dir={finished_run} already holds a finished run" in err
    assert "output.overwrite=true" in err
    assert (finished_run / "eval_results.json").read_text() == before


def test_overwrite_replaces_a_finished_run(finished_run: Path, tiny_bert, toy_data, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "eval_results.json").write_text("{}")
    (out / "notes.txt").write_text("user file")  # not ours: overwrite must keep it
    args = toy_args(tiny_bert, toy_data, out, "train.max_steps=3", "output.overwrite=true")
    result = launch(CLASSIFY, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "eval_results.json").read_text())["step"] == 3
    assert (out / "notes.txt").read_text() == "user file"


def test_cli_errors_through_python_and_accelerate_launch(tmp_path):
    """The issue's example: a misspelt key is named with its fix, before anything loads."""
    cmd = [sys.executable, str(CLASSIFY), "train.lr=1e-4", "trian.epochs=1", f"output.dir={tmp_path / 'o'}"]
    direct = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 2
    assert "did you mean `train.epochs`?" in direct.stderr
    assert "Traceback" not in direct.stderr
    launched = launch(CLASSIFY, ["train.lr=1e-4", "trian.epochs=1", f"output.dir={tmp_path / 'o'}"])
    assert launched.returncode != 0  # accelerate launch reports any child failure as its own exit 1
    assert "trian.epochs (command line): unknown key; did you mean `train.epochs`?" in launched.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# --dry-run: everything resolved and checked, nothing trained or written
# ---------------------------------------------------------------------------------------------


def test_dry_run_reports_data_steps_parameters_and_memory_without_writing(
    finished_run, tiny_bert, toy_data, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification

    from finetune.core.modeling import apply_lora
    from finetune.core.schemas import LoraConfig

    out = tmp_path / "out"
    recipe_main()([*toy_args(tiny_bert, toy_data, out), "--dry-run"])
    printed = capsys.readouterr().out
    assert not out.exists(), "a dry run writes nothing"
    assert "train: 240 examples; labels animal 80, fruit 80, vehicle 80" in printed
    assert "validation: 37 examples; labels" in printed and "0 of 240 (0.0%) longer than 32" in printed
    assert "effective batch 16 = micro-batch 8 x accumulation 2 x 1 process(es)" in printed
    assert "optimizer steps: 120 (8 epochs)" in printed  # what the finished run trained
    model = AutoModelForSequenceClassification.from_pretrained(finished_run / "final")
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,}, {total:,} trainable (100.00%)" in printed
    assert re.search(r"peak memory per process at micro-batch 8 x \d+ tokens \(estimate\)", printed)

    recipe_main()([*toy_args(tiny_bert, toy_data, out), "lora.enabled=true", "lora.r=4", "--dry-run"])
    printed = capsys.readouterr().out
    lora = apply_lora(model, LoraConfig(enabled=True, r=4))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert f"{trainable:,} trainable with LoRA" in printed and not out.exists()
