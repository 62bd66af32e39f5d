"""A regression head through the recipe and finetune-eval: it learns the scores, scores in pipeline and finetune-eval
as in training, ranks a run's models by its metric, and a peft adapter dir is scored with its adapter. (Data, model and
metrics, in one process: tests/unit/test_regression.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CLASSIFY, KEYWORDS, keyword_rows, launch, read_jsonl, reset_accelerate_state, write_rows
from transformers import AutoConfig, AutoTokenizer, pipeline

from finetune.classify.model import load_classifier
from finetune.core.schemas import ModelConfig
from finetune.eval import main as score_main


def scored_rows(n: int, seed: int) -> list[dict]:
    """Toy rows whose score is half the number of fruit words in the text: 0 for other topics, 1.0..3.0."""
    rows = keyword_rows(n, seed=seed)
    return [
        {"text": r["text"], "score": sum(w in KEYWORDS["fruit"] for w in r["text"].split()) / 2, "topic": r["label"]}
        for r in rows
    ]


def score(args: list[str]) -> None:
    """finetune-eval in this process (a fresh Accelerate state each time)."""
    reset_accelerate_state()
    score_main(args)


@pytest.fixture(scope="module")
def regression_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regression_data")
    return {
        "train": write_rows(root / "train.csv", scored_rows(240, seed=1)),
        "validation": write_rows(root / "validation.csv", scored_rows(37, seed=2)),
    }


@pytest.fixture(scope="module")
def regression_run(tiny_bert, regression_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("regression_run") / "out"
    args = [
        f"model.name_or_path={tiny_bert}",
        f"data.train={regression_data['train']}",
        f"data.validation={regression_data['validation']}",
        "data.task=regression",
        "data.label_column=score",
        "data.max_length=32",
        "train.max_steps=60",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "eval.every_n_steps=20",
        "eval.batch_size=8",
        f"output.dir={output_dir}",
    ]
    result = launch(CLASSIFY, args)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_recipe_learns_the_scores(regression_run, regression_data):
    results = json.loads((regression_run / "eval_results.json").read_text())
    assert {"pearson", "spearman", "mse", "loss"} <= set(results) and "accuracy" not in results
    assert results["num_examples"] == 37 and results["loss"] == results["mse"]
    gold = pd.read_csv(regression_data["validation"])["score"].to_numpy()
    # Better than the best constant guess (the mean, whose MSE is the variance) by a wide margin.
    assert results["mse"] < 0.5 * gold.var(), (results["mse"], gold.var())
    assert results["pearson"] > 0.8
    evals = [r for r in read_jsonl(regression_run / "metrics.jsonl") if "eval_mse" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["eval_mse"] < evals[0]["eval_mse"]
    config = AutoConfig.from_pretrained(regression_run / "final")
    assert config.num_labels == 1 and config.problem_type == "regression" and config.id2label == {0: "score"}


def test_final_model_scores_in_pipeline_and_finetune_eval_as_in_training(regression_run):
    score([str(regression_run / "final")])
    eval_dir = regression_run / "final" / "eval"
    scored = json.loads((eval_dir / "eval_results.json").read_text())
    training = json.loads((regression_run / "eval_results.json").read_text())
    for key in ("pearson", "spearman", "mse", "loss"):
        assert scored[key] == pytest.approx(training[key], abs=1e-6), key
    assert scored["num_examples"] == 37
    assert not (eval_dir / "per_class.csv").exists() and not (eval_dir / "confusion_matrix.png").exists()
    rows = read_jsonl(eval_dir / "predictions.jsonl")
    assert len(rows) == 37 and set(rows[0]) == {"text", "gold", "predicted"}
    assert all(isinstance(r["gold"], float) and isinstance(r["predicted"], float) for r in rows)
    assert np.mean([(r["gold"] - r["predicted"]) ** 2 for r in rows]) == pytest.approx(scored["mse"], abs=1e-6)
    outputs = pipeline("text-classification", model=str(regression_run / "final"), device="cpu")(
        [r["text"] for r in rows[:5]], truncation=True
    )
    # pipeline on CPU, finetune-eval on the GPU where there is one: a bound that holds across devices
    assert [o["score"] for o in outputs] == pytest.approx([r["predicted"] for r in rows[:5]], abs=1e-4)


def test_run_leaderboard_follows_the_saved_metric_for_best(regression_run, tmp_path):
    """A second model with its head's sign flipped; the run's config says mse (lower is better) picks the best."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(regression_run, run, ignore=shutil.ignore_patterns("eval"))
    checkpoint = run / "checkpoints" / "step_000020" / "model"
    shutil.copytree(run / "final", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights = {k: -v if k.startswith("classifier") else v for k, v in weights.items()}
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    config = (run / "config.yaml").read_text()
    assert "metric_for_best: null" in config
    (run / "config.yaml").write_text(config.replace("metric_for_best: null", "metric_for_best: mse"))
    score([str(run)])
    board = json.loads((run / "eval" / "leaderboard.json").read_text())
    assert [row["model"] for row in board] == ["final", "step_000020"]
    assert board[0]["mse"] < board[1]["mse"] and board[0]["best"]
    assert (run / "eval" / "leaderboard.csv").read_text().startswith("model,step,pearson,spearman,mse,loss,best")


def test_other_data_with_and_without_scores(regression_run, tmp_path):
    labelled = write_rows(tmp_path / "l.jsonl", [{"s": "apple pear", "y": 1}, {"s": "a bus", "y": 0.0}])
    args = ["data.text_column=s", "data.label_column=y", f"output.dir={tmp_path / 'l'}"]
    score([str(regression_run / "final"), f"data.validation={labelled}", *args])
    results = json.loads((tmp_path / "l" / "eval_results.json").read_text())
    assert results["num_examples"] == 2 and "mse" in results
    unlabelled = write_rows(tmp_path / "u.jsonl", [{"text": "a red plum"}, {"text": "my old cow"}])
    score([str(regression_run / "final"), f"data.validation={unlabelled}", f"output.dir={tmp_path / 'p'}"])
    rows = read_jsonl(tmp_path / "p" / "predictions.jsonl")
    assert [r["gold"] for r in rows] == [None, None] and all(isinstance(r["predicted"], float) for r in rows)
    assert "mse" not in json.loads((tmp_path / "p" / "eval_results.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.label_column=topic"], "data.label_column='topic' must hold numbers for data.task=regression"),
        (["eval.metrics=[accuracy]"], "eval.metrics: ['accuracy'] do not apply to a regression (1 output) model"),
    ],
)
def test_bad_input_for_a_regression_model(regression_run, regression_data, extra, message, capsys):
    args = [str(regression_run / "final"), f"data.validation={regression_data['validation']}", *extra]
    with pytest.raises(SystemExit) as exit_info:
        score(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("with_config", [False, True], ids=["adapter-only", "adapter+config.json"])
def test_a_peft_adapter_dir_is_scored_with_its_adapter(tiny_bert, regression_data, tmp_path, with_config):
    from peft import LoraConfig, TaskType, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    model = load_classifier(ModelConfig(name_or_path=str(tiny_bert)), [], tokenizer, task="regression")
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules="all-linear"))
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make the adapter change the outputs
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    adapter_dir = tmp_path / "checkpoints" / "step_000004" / "model"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if with_config:
        model.config.save_pretrained(adapter_dir)
    assert not (adapter_dir / "model.safetensors").exists()

    data = [f"data.validation={regression_data['validation']}", "data.label_column=score"]
    score([str(adapter_dir.parent), *data, f"output.dir={tmp_path / 'e'}"])
    rows = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    texts = [r["text"] for r in rows]
    peft_model.eval()
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model(**inputs).logits[:, 0]
        with peft_model.disable_adapter():
            without_adapter = peft_model(**inputs).logits[:, 0]
    assert [r["predicted"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)  # CPU vs scoring device
    assert not torch.allclose(expected, without_adapter, atol=1e-3)  # so the match above needs the adapter
    results = json.loads((tmp_path / "e" / "eval_results.json").read_text())
    assert results["step"] == 4 and results["num_examples"] == 37 and "mse" in results
