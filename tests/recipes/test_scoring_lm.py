"""finetune-eval on causal LMs: a run of recipes/sft.py scored model by model, an adapter, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import SFT, read_jsonl, recipe_main, reset_accelerate_state, sft_args

from finetune.eval import CAUSAL_LM, CLASSIFIER, model_kind
from finetune.eval import main as score_main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_run(tiny_lm, chat_data, tmp_path_factory, one_thread):
    """A 2-step SFT run (model.random_init): checkpoints/step_000001 and final/."""
    out = tmp_path_factory.mktemp("lm_scored") / "run"
    args = ["train.max_steps=2", "checkpoint.every_n_steps=1", "eval.num_generations=0", "train.cpu_threads=1"]
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, out, *args))
    reset_accelerate_state()
    return out


def score(args: list[str], capsys) -> tuple[str, str]:
    reset_accelerate_state()
    score_main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_run_dir_gives_a_leaderboard_by_loss_as_training_scored(lm_run, capsys):
    out, _ = score([lm_run, "eval.num_generations=2"], capsys)
    assert "leaderboard by loss" in out
    board = json.loads((lm_run / "eval" / "leaderboard.json").read_text())
    assert sorted((row["model"], row["step"]) for row in board) == [("final", 2), ("step_000001", 1)]
    assert [row["loss"] for row in board] == sorted(row["loss"] for row in board) and board[0]["best"]
    scored = {row["model"]: row for row in board}
    training = json.loads((lm_run / "eval_results.json").read_text())
    assert scored["final"]["loss"] == pytest.approx(training["loss"], abs=1e-5)  # same data, tokens, code
    assert scored["final"]["tokens"] == training["tokens"]
    at_checkpoint = json.loads((lm_run / "checkpoints" / "step_000001" / "progress.json").read_text())["metrics"]
    assert scored["step_000001"]["loss"] == pytest.approx(at_checkpoint["loss"], abs=1e-5)
    for name, row in scored.items():
        assert row["perplexity"] == pytest.approx(2.718281828459045 ** row["loss"], rel=1e-9)
        assert 0 <= row["exact_match"] <= 1
        generations = read_jsonl(lm_run / "eval" / name / "generations.jsonl")
        assert len(generations) == 2 and {"prompt", "reference", "generated"} <= set(generations[0])
    csv_header = (lm_run / "eval" / "leaderboard.csv").read_text().splitlines()[0]
    assert csv_header == "model,step,loss,perplexity,tokens,exact_match,best"


def test_checkpoint_dir_with_the_runs_targets_or_every_token(lm_run, tmp_path, capsys):
    checkpoint = lm_run / "checkpoints" / "step_000001"
    score([checkpoint, f"output.dir={tmp_path / 'a'}"], capsys)
    score([checkpoint, "data.train_on_prompt=true", f"output.dir={tmp_path / 'b'}"], capsys)
    masked, every = (json.loads((tmp_path / d / "eval_results.json").read_text()) for d in "ab")
    assert masked["step"] == 1 and masked["tokens"] == 84 and "exact_match" not in masked
    assert every["tokens"] > 4 * masked["tokens"]  # the prompts' tokens count too
    assert not (tmp_path / "a" / "generations.jsonl").exists()


def test_adapter_is_scored_on_its_base_model(lm_run, chat_data, tmp_path, capsys):
    """A peft adapter outside any run: base model from adapter_config.json, max_length from its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core.schemas import SFTDataConfig
    from finetune.lm.data import load_sft_data
    from finetune.lm.tokenize import tokenize_sft

    tokenizer = AutoTokenizer.from_pretrained(lm_run / "final")
    base = AutoModelForCausalLM.from_pretrained(lm_run / "final")
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    score([adapter, f"data.validation={chat_data['validation']}"], capsys)
    results = json.loads((adapter / "eval" / "eval_results.json").read_text())

    data = SFTDataConfig(train=str(chat_data["train"]), validation=str(chat_data["validation"]), max_length=64)
    rows, _ = tokenize_sft(load_sft_data(data).validation, tokenizer, data)
    peft_model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = peft_model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += int((targets != -100).sum())
    assert results["tokens"] == count
    assert results["loss"] == pytest.approx(total / count, rel=1e-5)
    plain = json.loads((lm_run / "eval_results.json").read_text())["loss"]
    assert abs(results["loss"] - plain) > 1e-3  # the adapter was applied


def test_adapters_of_a_random_init_run_cannot_be_scored(lm_run, tmp_path, capsys):
    """The adapter checkpoints of a model.random_init run are skipped (its final/ is scored) or refused alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora_run"
    run.mkdir()
    shutil.copy(lm_run / "config.yaml", run / "config.yaml")
    shutil.copytree(lm_run / "final", run / "final")
    model = AutoModelForCausalLM.from_pretrained(lm_run / "final")
    adapter = run / "checkpoints" / "step_000001" / "model"
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    model.config.save_pretrained(adapter)  # as the recipe saves a LoRA checkpoint: the base config beside

    _, err = score([run], capsys)
    assert "skipped step_000001: LoRA adapters of a model.random_init run" in err
    board = json.loads((run / "eval" / "leaderboard.json").read_text())
    assert [row["model"] for row in board] == ["final"]

    err = refused([adapter.parent], capsys)
    assert "is a LoRA adapter of a model.random_init run" in err and "never saved" in err


def refused(args: list, capsys, one_line: bool = True) -> str:
    reset_accelerate_state()
    with pytest.raises(SystemExit) as exit_info:
        score_main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or not one_line, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "data.validation={tmp}/missing.jsonl"], "data.validation: file or folder not found"),
        (["{tmp}"], "is not a model, a checkpoint or a run"),
        (["{run}/final", "eval.metric_for_best=exact_match"], "eval.metric_for_best=exact_match needs generations"),
        (["{run}/final", "data.max_length=4096"], "data.max_length=4096 is above the model's limit of 128 tokens"),
    ],
)
def test_bad_input(args, message, lm_run, tmp_path, capsys):
    config_problem = "metric_for_best" in message  # a config error lists its problems, one per line
    err = refused([a.format(run=lm_run, tmp=tmp_path) for a in args], capsys, one_line=not config_problem)
    assert message in err


def test_kind_of_model_from_its_config_or_the_run(tmp_path):
    def kind(config: dict, saved: dict | None = None) -> str:
        (tmp_path / "config.json").write_text(json.dumps(config))
        return model_kind(tmp_path, saved)

    assert kind({"architectures": ["LlamaForCausalLM"]}) == CAUSAL_LM
    assert kind({"architectures": ["GPT2LMHeadModel"]}) == CAUSAL_LM
    assert kind({"architectures": ["BertForSequenceClassification"]}, {"train": {"chunked_loss": True}}) == CLASSIFIER
    assert kind({"model_type": "llama"}, {"data": {"format": "auto"}}) == CAUSAL_LM
    assert kind({"model_type": "llama"}, {"data": {"task": "classification"}}) == CLASSIFIER
    assert kind({"model_type": "qwen2"}) == CAUSAL_LM
    assert kind({"model_type": "no_such_type"}) == CLASSIFIER
