"""finetune-eval: scoring a model, a checkpoint and a run, on one and two processes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, free_port, read_jsonl, recipe_main, reset_accelerate_state, toy_args, write_rows
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from finetune.eval import leaderboard
from finetune.eval import main as score_main


@pytest.fixture(scope="module")
def run_dir(tiny_bert, toy_data, tmp_path_factory):
    """A finished toy run (in this process), plus a second model in checkpoints/ with damaged weights."""
    out = tmp_path_factory.mktemp("scored") / "run"
    reset_accelerate_state()
    recipe_main()(toy_args(tiny_bert, toy_data, out, "checkpoint.every_n_steps=null"))  # one made below
    reset_accelerate_state()
    checkpoint = out / "checkpoints" / "step_000010" / "model"
    shutil.copytree(out / "final", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights = {k: v * 0 if k.startswith("classifier") else v for k, v in weights.items()}
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return out


def score(args: list[str], capsys) -> str:
    reset_accelerate_state()
    score_main(args)
    return capsys.readouterr().out


def test_final_model_is_scored_as_training_scored_it(run_dir, capsys):
    score([str(run_dir / "final")], capsys)
    results = json.loads((run_dir / "final" / "eval" / "eval_results.json").read_text())
    training = json.loads((run_dir / "eval_results.json").read_text())
    for key in ("accuracy", "f1_macro", "num_examples"):
        assert results[key] == training[key]  # same data (the run's own validation file), same code path
    assert results["loss"] == pytest.approx(training["loss"], rel=1e-4)  # training under autocast on a GPU
    assert len(results["data_fingerprint"]) == 16
    rows = read_jsonl(run_dir / "final" / "eval" / "predictions.jsonl")
    assert len(rows) == 37 and {"text", "gold", "predicted", "probabilities"} <= set(rows[0])
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    accuracy = sum(r["gold"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == results["accuracy"]
    with (run_dir / "final" / "eval" / "per_class.csv").open() as f:
        per_class = list(csv.DictReader(f))
    assert [r["label"] for r in per_class] == ["animal", "fruit", "vehicle"]
    assert sum(int(r["support"]) for r in per_class) == 37
    assert (run_dir / "final" / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_run_dir_gives_a_leaderboard_of_every_model(run_dir, capsys):
    out = score([str(run_dir)], capsys)
    assert "leaderboard by accuracy" in out
    board = json.loads((run_dir / "eval" / "leaderboard.json").read_text())
    assert [row["model"] for row in board] == ["final", "step_000010"]  # the damaged head scores worse
    assert [row["best"] for row in board] == [True, False]
    assert board[1]["step"] == 10
    assert (run_dir / "eval" / "step_000010" / "predictions.jsonl").is_file()
    assert (run_dir / "eval" / "final" / "predictions.jsonl").is_file()
    assert (run_dir / "eval" / "leaderboard.csv").read_text().startswith("model,step,accuracy,f1_macro,loss,best")


def test_checkpoint_dir_and_other_data(run_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "new.csv", [{"sentence": "red apple pear", "y": "fruit"}] * 3)
    args = [
        str(run_dir / "checkpoints" / "step_000010"),
        f"data.validation={data}",
        "data.text_column=sentence",
        "data.label_column=y",
        f"output.dir={tmp_path / 'scores'}",
    ]
    score(args, capsys)
    results = json.loads((tmp_path / "scores" / "eval_results.json").read_text())
    assert results["num_examples"] == 3 and results["step"] == 10


def test_data_without_labels_gives_predictions_only(run_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "unlabelled.jsonl", [{"text": "a big bus"}, {"text": "my old cow"}])
    score([str(run_dir / "final"), f"data.validation={data}", f"output.dir={tmp_path / 'p'}"], capsys)
    rows = read_jsonl(tmp_path / "p" / "predictions.jsonl")
    assert [r["gold"] for r in rows] == [None, None] and all(r["predicted"] for r in rows)
    assert "accuracy" not in json.loads((tmp_path / "p" / "eval_results.json").read_text())


def test_lora_checkpoint_of_a_run_is_scored_with_the_runs_labels(run_dir, tiny_bert, tmp_path, capsys):
    """A peft adapter saved without config.json (as peft saves one): its label names come from the run's data."""
    from peft import LoraConfig, TaskType, get_peft_model

    from finetune.classify.model import load_classifier
    from finetune.core.schemas import ModelConfig

    run = tmp_path / "lora_run"
    run.mkdir()
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = load_classifier(ModelConfig(name_or_path=str(tiny_bert)), ["animal", "fruit", "vehicle"], tokenizer)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules="all-linear"))
    with torch.no_grad():  # a non-trivial adapter and head
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                parameter.normal_(std=0.5)
    checkpoint = run / "checkpoints" / "step_000007" / "model"
    peft_model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    out = score([str(run)], capsys)
    assert "leaderboard by accuracy" in out
    board = json.loads((run / "eval" / "leaderboard.json").read_text())
    assert [(row["model"], row["step"]) for row in board] == [("step_000007", 7)]
    rows = read_jsonl(run / "eval" / "step_000007" / "predictions.jsonl")
    assert len(rows) == 37 and {r["gold"] for r in rows} == {"animal", "fruit", "vehicle"}
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)).logits
    probabilities = torch.softmax(logits, -1)
    saved = [p for r in rows for p in r["probabilities"].values()]
    assert saved == pytest.approx(probabilities.flatten().tolist(), abs=1e-4)  # CPU vs the scoring device
    assert list(rows[0]["probabilities"]) == ["animal", "fruit", "vehicle"]


def test_lora_runs_adapter_dirs_hold_their_labels_and_final_adapter_is_scored_from_them(
    tiny_bert, toy_data, tmp_path, capsys
):
    """A LoRA run writes config.json (the head's labels) beside every adapter: a checkpoint's model/ and
    final/adapter/, which then scores on its own (no run dir, no training data to rebuild the labels from) as the
    merged final/ does."""
    out = tmp_path / "lora"
    extra = (
        "lora.enabled=true",
        "lora.target_modules=[query,value]",
        "train.lr=1e-2",
        "train.max_steps=6",
        "checkpoint.every_n_steps=3",
    )
    recipe_main()(toy_args(tiny_bert, toy_data, out, *extra))
    labels = {"0": "animal", "1": "fruit", "2": "vehicle"}
    for adapter in (out / "final" / "adapter", out / "checkpoints" / "step_000003" / "model"):
        config = json.loads((adapter / "config.json").read_text())
        assert config["id2label"] == labels and config["label2id"] == {v: int(k) for k, v in labels.items()}
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert not (out / "final" / "config.yaml").exists()  # final/adapter/ is no model of a run: no data to name labels

    data = f"data.validation={toy_data['validation']}"
    score([str(out / "final" / "adapter"), data, f"output.dir={tmp_path / 'adapter'}"], capsys)
    score([str(out / "final"), data, f"output.dir={tmp_path / 'merged'}"], capsys)
    adapter_rows, merged_rows = (read_jsonl(tmp_path / d / "predictions.jsonl") for d in ("adapter", "merged"))
    assert len(adapter_rows) == 37 and list(adapter_rows[0]["probabilities"]) == ["animal", "fruit", "vehicle"]
    assert [r["predicted"] for r in adapter_rows] == [r["predicted"] for r in merged_rows]
    adapter_p = [p for r in adapter_rows for p in r["probabilities"].values()]
    assert adapter_p == pytest.approx([p for r in merged_rows for p in r["probabilities"].values()], abs=1e-4)
    results = json.loads((tmp_path / "adapter" / "eval_results.json").read_text())
    assert results["accuracy"] == json.loads((out / "eval_results.json").read_text())["accuracy"]


def test_leaderboard_order_by_metric_direction_and_nan_last():
    rows = [{"model": "a", "pearson": 0.5, "mse": 0.4}, {"model": "b", "pearson": float("nan"), "mse": 0.9}]
    rows.append({"model": "c", "pearson": 0.9, "mse": 0.2})
    assert [r["model"] for r in leaderboard([dict(r) for r in rows], "pearson")] == ["c", "a", "b"]
    ranked = leaderboard([dict(r) for r in rows], "mse")
    assert [r["model"] for r in ranked] == ["c", "a", "b"] and [r["best"] for r in ranked] == [True, False, False]
    rows[1]["mse"] = 0.1
    assert [r["model"] for r in leaderboard(rows, "mse")] == ["b", "c", "a"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["{run}/final", "data.validation={sst2}", "data.text_column=sentence"],
            "the data's labels ['0', '1'] are not labels of the model (animal, fruit, vehicle)",
        ),
        (["{run}/final", "data.validation={sst2}"], "column(s) ['text'] not found; the columns are: sentence, label"),
        (["{run}/final", "eval.metrics=[acuracy]"], "unknown metric(s) ['acuracy']"),
        (["{tmp}"], "is not a model, a checkpoint or a run: expected config.json and model.safetensors"),
    ],
)
def test_bad_input(args, message, run_dir, tmp_path, capsys):
    sst2 = write_rows(
        tmp_path / "sst2.tsv", [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]
    )
    args = [a.format(run=run_dir, sst2=sst2, tmp=tmp_path) for a in args]
    reset_accelerate_state()
    with pytest.raises(SystemExit) as exit_info:
        score_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_processes_score_every_example_once(run_dir, tmp_path):
    """37 examples in batches of 4 over 2 processes: uneven, and the metrics equal one process's."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "finetune.eval",
        str(run_dir / "final"),
        "eval.batch_size=4",
        f"output.dir={tmp_path / 'two'}",
    ]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    one = json.loads((run_dir / "eval_results.json").read_text())
    assert two["num_examples"] == 37
    assert two["accuracy"] == one["accuracy"] and two["f1_macro"] == one["f1_macro"]
    texts = [r["text"] for r in read_jsonl(tmp_path / "two" / "predictions.jsonl")]
    assert len(texts) == 37 and texts == [
        r["text"] for r in read_jsonl(run_dir / "final" / "eval" / "predictions.jsonl")
    ]
