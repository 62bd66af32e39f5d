"""finetune-eval on preference models: a run of recipes/dpo.py scored model by model against its reference as
training scored it, a LoRA run's adapter checkpoints on their base, bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import DPO, dpo_args, launch, read_jsonl, recipe_main, reset_accelerate_state, write_rows

from finetune.core.config import load_config
from finetune.core.metric_names import MetricGoal
from finetune.core.schemas import ScoreDPOConfig
from finetune.eval import is_dpo_config, usage
from finetune.eval import main as score_main
from finetune.preference.loss import STATS

COMPARED = ("loss", *STATS)  # rewards, accuracy and log-probs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_tiny(tiny_lm, tmp_path_factory):
    """The tiny LLaMA with seeded random weights, saved: a starting model that loads again as the reference (a
    model.random_init run's never does)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("saved_tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_lm)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(path)
    return path


def tiny_dpo_args(tiny_lm, pair_data, out, saved_tiny, *extra: str) -> list[str]:
    return dpo_args(
        tiny_lm,
        pair_data,
        out,
        "model.random_init=false",
        f"model.name_or_path={saved_tiny}",
        "eval.every_n_steps=2",
        "checkpoint.every_n_steps=2",
        "train.cpu_threads=1",
        *extra,
    )


@pytest.fixture(scope="module")
def dpo_run(tiny_lm, pair_data, saved_tiny, tmp_path_factory):
    """A 5-step full fine-tune (reference precomputed): checkpoints/step_000002, step_000004 and final/."""
    out = tmp_path_factory.mktemp("dpo_scored") / "run"
    result = launch(DPO, tiny_dpo_args(tiny_lm, pair_data, out, saved_tiny, "train.max_steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def score(args: list, capsys) -> tuple[str, str]:
    reset_accelerate_state()
    score_main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def assert_ranked(board: list[dict], metric: str) -> None:
    goal = MetricGoal.of(metric)
    assert [goal.sort_key(row[metric]) for row in board] == sorted(goal.sort_key(row[metric]) for row in board)
    assert board[0]["best"] and not any(row["best"] for row in board[1:])


def test_run_dir_scores_every_model_against_its_reference_as_training_did(dpo_run, capsys):
    out, _ = score([dpo_run, "eval.num_generations=2"], capsys)
    assert "leaderboard by loss" in out  # the run's eval.metric_for_best
    board = json.loads((dpo_run / "eval" / "leaderboard.json").read_text())
    assert sorted((row["model"], row["step"]) for row in board) == [
        ("final", 5),
        ("reference", 0),
        ("step_000002", 2),
        ("step_000004", 4),
    ]
    assert_ranked(board, "loss")
    scored = {row["model"]: row for row in board}
    training = json.loads((dpo_run / "eval_results.json").read_text())
    evaluated = {name: training for name in ("final",)}
    for checkpoint in ("step_000002", "step_000004"):
        progress = json.loads((dpo_run / "checkpoints" / checkpoint / "progress.json").read_text())
        evaluated[checkpoint] = progress["metrics"]
    for model, metrics in evaluated.items():  # same pairs, batches, reference and code
        for name in COMPARED:
            assert scored[model][name] == pytest.approx(metrics[name], rel=1e-4), (model, name)
    assert scored["final"]["pairs"] == training["pairs"] == 12
    # The reference against itself: no reward, no pair preferred, the loss log 2.
    reference = scored["reference"]
    assert reference["rewards/margin"] == reference["rewards/chosen"] == reference["accuracy"] == 0
    assert reference["loss"] == pytest.approx(math.log(2), rel=1e-6)
    for name in ("reference", "step_000002", "final"):
        assert 0 <= scored[name]["exact_match"] <= 1
        assert len(read_jsonl(dpo_run / "eval" / name / "generations.jsonl")) == 2
    header = (dpo_run / "eval" / "leaderboard.csv").read_text().splitlines()[0]
    assert header == (
        "model,step,loss,accuracy,rewards/margin,rewards/chosen,rewards/rejected,logps/chosen,logps/rejected,"
        "pairs,exact_match,best"
    )


def test_lora_adapters_are_scored_on_their_base(tiny_lm, pair_data, saved_tiny, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["lora.enabled=true", "train.max_steps=3", "train.lr=3e-2", "eval.num_generations=0"]
    recipe_main(DPO)(tiny_dpo_args(tiny_lm, pair_data, out, saved_tiny, *args))
    capsys.readouterr()
    adapter = out / "checkpoints" / "step_000002" / "model"
    assert (adapter / "adapter_model.safetensors").is_file()

    score([out, "eval.metric_for_best=rewards/rejected"], capsys)  # lower is better
    board = json.loads((out / "eval" / "leaderboard.json").read_text())
    assert sorted(row["model"] for row in board) == ["final", "reference", "step_000002"]
    assert_ranked(board, "rewards/rejected")
    scored = {row["model"]: row for row in board}
    assert scored["step_000002"]["model_path"] == str(adapter)
    # As training evaluated them, the reference its adapters off: the adapter on its base, and merged into it.
    evaluated = {
        "step_000002": json.loads((adapter.parent / "progress.json").read_text())["metrics"],
        "final": json.loads((out / "eval_results.json").read_text()),
    }
    for model, metrics in evaluated.items():
        for name in COMPARED:
            assert scored[model][name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-6), (model, name)
    assert abs(scored["step_000002"]["rewards/margin"]) > 1e-4  # the adapter was applied


def refused(args: list, capsys) -> str:
    reset_accelerate_state()
    with pytest.raises(SystemExit) as exit_info:
        score_main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "data.validation={tmp}/answers.jsonl"], "no column data.chosen_column='chosen'"),
        (["{run}/final", "reference.name_or_path={tmp}/missing"], "reference.name_or_path={tmp}/missing: no such"),
        (["{random_init_run}"], "random weights were never saved"),
        (["{tmp}/lone", "reference.name_or_path={saved}"], "no pairs to score on: give data.validation"),
        (["{run}", "dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing applies to dpo.loss=sigmoid"),
    ],
)
def test_bad_input(args, message, dpo_run, saved_tiny, tmp_path, capsys):
    write_rows(tmp_path / "answers.jsonl", [{"prompt": "reverse ab", "answer": "ba"}])
    shutil.copytree(dpo_run / "final", tmp_path / "lone")  # a model outside its run
    random_init_run = tmp_path / "random_init_run"  # the run as model.random_init would have written it
    shutil.copytree(dpo_run / "final", random_init_run / "final")
    config = (dpo_run / "config.yaml").read_text().replace("random_init: false", "random_init: true")
    (random_init_run / "config.yaml").write_text(config)
    fields = {"run": dpo_run, "tmp": tmp_path, "random_init_run": random_init_run, "saved": saved_tiny}
    err = refused([a.format(**fields) for a in args], capsys)
    assert message.format(**fields) in err


def test_help_lists_the_preference_keys():
    text = usage()
    assert all(key in text for key in ("reference.name_or_path", "dpo.beta", "dpo.sft_weight", "rewards/rejected"))
    assert is_dpo_config({"dpo": {"beta": 0.1}}) and not is_dpo_config({"data": {"format": "chat"}})
    assert not is_dpo_config(None)


@pytest.mark.parametrize(
    ("args", "run_choice", "expected"),
    [
        ([], None, "accuracy"),
        ([], "rewards/margin", "rewards/margin"),
        ([], "exact_match", "accuracy"),  # the run's choice needs generations, which scoring does not make by default
        (["eval.num_generations=2"], "exact_match", "exact_match"),
        (["eval.metric_for_best=logps/rejected"], "loss", "logps/rejected"),
    ],
)
def test_metric_for_best(args, run_choice, expected):
    assert load_config(ScoreDPOConfig, args).metric_for_best(run_choice) == expected
