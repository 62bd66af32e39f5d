"""recipes/classify.py end to end: through `accelerate launch` as users run it, and its bad-input paths."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLASSIFY, REPO, launch, read_jsonl, write_rows

pytestmark = pytest.mark.recipe


def toy_args(tiny_bert: Path, toy_data: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=8",
        "train.micro_batch_size=8",
        "train.gradient_accumulation_steps=2",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "eval.every_n_steps=20",
        "eval.batch_size=8",
        "logging.every_n_steps=5",
        f"output.dir={output_dir}",
        *extra,
    ]


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


def test_final_model_loads_in_pipeline_with_label_names(finished_run: Path):
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(finished_run / "final"), device="cpu")
    predictions = classifier(["the big red apple", "a very old bus", "my cat is on the cow"])
    assert [p["label"] for p in predictions] == ["fruit", "vehicle", "animal"]


def test_saved_config_reproduces_the_run(finished_run: Path, tmp_path):
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["output"]["dir"] == str(finished_run)
    rerun_dir = tmp_path / "rerun"
    result = launch(CLASSIFY, ["--config", str(finished_run / "config.yaml"), f"output.dir={rerun_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((finished_run / "eval_results.json").read_text())
    again = json.loads((rerun_dir / "eval_results.json").read_text())
    run_stats = ("train_runtime_s", "train_samples_per_s", "train_tokens_per_s", "memory_mb")  # of the machine
    assert {k: v for k, v in again.items() if k not in run_stats} == {
        k: v for k, v in first.items() if k not in run_stats
    }
    assert again["train_samples_per_s"] > 0 and again["memory_mb"]["peak"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the key or file, no traceback, nothing written.
# ---------------------------------------------------------------------------------------------


def recipe_main():
    spec = importlib.util.spec_from_file_location("classify_recipe", CLASSIFY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_bad(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        recipe_main()(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_before_writing(tiny_bert, toy_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = toy_args(tiny_bert, toy_data, out)
    no_text = write_rows(tmp_path / "no_text.csv", [{"sentence": "a", "label": "x"}] * 5)
    unseen = write_rows(tmp_path / "unseen.csv", [{"text": "the red apple", "label": "mineral"}])
    empty = write_rows(tmp_path / "empty.jsonl", [{"text": " ", "label": "x"}])
    cases = {
        "trian.epochs=1": "trian.epochs (command line): unknown key; did you mean `train.epochs`?",
        f"data.train={tmp_path / 'missing.csv'}": f"data.train: file or folder not found: {tmp_path / 'missing.csv'}",
        f"data.train={no_text}": "data.text_column='text' not found; the columns are: sentence, label",
        f"data.validation={unseen}": "label(s) never seen in training: 'mineral' (1x)",
        f"data.train={empty}": "no examples left after dropping rows with empty text",
        "data.max_length=512": "data.max_length=512 is above the model's limit of 64 tokens",
        "train.lr_scheduler=cosin": "train.lr_scheduler (command line): expected one of linear, cosine, constant",
        "eval.metrics=[accuracy,acuracy]": "eval.metrics: unknown metric(s) ['acuracy']; offline metrics are",
    }
    for override, message in cases.items():
        assert message in run_bad([*base, override], capsys), override
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    err = run_bad([*base, "train.mixed_precision=bf16"], capsys)
    assert "train.mixed_precision=bf16 (recipe config) conflicts with mixed precision 'no' from the launcher" in err
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
