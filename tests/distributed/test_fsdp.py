"""FSDP2 with the shipped accelerate_configs/fsdp.yaml, on 2 CPU processes over gloo (finetune/fsdp.py makes
Accelerate run it as FSDP2 rather than DDP): BERT and LLaMA train, checkpoints hold full models and resume
bitwise after kill -9, and one sharded optimizer step equals the unsharded one (tied and untied LM heads).

Run as a script (`accelerate launch tests/test_fsdp.py KIND:MODEL_DIR ...`) this file is that last check.
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_checkpoints
import torch
from conftest import CLASSIFY, REPO, launch, launch_command
from test_checkpoints import assert_same_weights, interrupt, run_args

from finetune.core.fsdp import fit_wrap_policy, materialize_meta_parameters
from finetune.training.checkpoints.layout import PROGRESS_FILE, list_checkpoints

FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp.yaml"
PROCESSES = 2
# 2 processes x micro-batch 4 x accumulation 2 = 16 examples a step: 15 steps an epoch; checkpoints every 10.
SETTINGS = ["train.epochs=2", "data.group_by_length=false"]


@pytest.fixture(autouse=True)
def cpu_processes(monkeypatch):
    """Launch on CPU (on a GPU machine too: the GPUs hidden) with the shipped FSDP config; the kill -9
    helper of test_checkpoints launches the same way."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(test_checkpoints, "launch_command", partial(launch_command, config_file=FSDP_CONFIG))


def launch_fsdp(script: Path, args: list[str]):
    result = launch(script, args, processes=PROCESSES, config_file=FSDP_CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_llama(path: Path, tokenizer_dir: Path, tie: bool) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llamas(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llama")
    return {name: tiny_llama(root / name, tiny_bert, tie=name == "tied") for name in ("tied", "untied")}


# --------------------------------------------------------------------------------------------
# Unit: the adjustments before accelerator.prepare
# --------------------------------------------------------------------------------------------


def test_wrap_policy_leaves_out_blocks_that_hold_the_embeddings(tiny_llamas, monkeypatch):
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy
    from transformers import AutoConfig, BertConfig, BertForSequenceClassification, LlamaForCausalLM

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1))
    assert set(bert._no_split_modules) == {"BertEmbeddings", "BertLayer"}  # what made Accelerate shard twice
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    assert fit_wrap_policy(plugin, bert) == ["BertLayer"] == plugin.transformer_cls_names_to_wrap
    llama = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_llamas["tied"]))
    assert fit_wrap_policy(plugin, llama) == ["LlamaDecoderLayer"]
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BertEmbeddings,BertLayer")  # from the config file
    assert fit_wrap_policy(plugin, bert) == ["BertLayer"]
    plugin.auto_wrap_policy = size_based_auto_wrap_policy
    assert fit_wrap_policy(plugin, bert) is None


def test_meta_parameters_get_storage_of_their_own_in_place():
    with torch.device("meta"):
        head = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(head.parameters())
    weight, bias = head.weight, head.bias
    assert weight.data_ptr() == bias.data_ptr() == 0  # how Accelerate's optimizer mapping merged them
    assert materialize_meta_parameters(head) == ["weight", "bias"]
    assert head.weight is weight and head.bias is bias and optimizer.param_groups[0]["params"] == [weight, bias]
    assert weight.device.type == "cpu" and weight.shape == (3, 4) and weight.data_ptr() != bias.data_ptr()
    assert materialize_meta_parameters(head) == []


# --------------------------------------------------------------------------------------------
# Through `accelerate launch --config_file accelerate_configs/fsdp.yaml`, 2 CPU processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("fsdp") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "true")
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        launch_fsdp(CLASSIFY, run_args(tiny_bert, toy_data, output_dir, *SETTINGS))
    return output_dir


def assert_full_transformers_model(path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, pipeline

    _, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    prediction = pipeline("text-classification", model=str(path), device="cpu")("apple pear plum", truncation=True)
    assert prediction[0]["label"] in {"fruit", "vehicle", "animal"}


@pytest.mark.recipe
@pytest.mark.multiprocess
def test_fsdp_run_trains_and_saves_full_models_and_full_state(fsdp_run):
    results = json.loads((fsdp_run / "eval_results.json").read_text())
    assert results["step"] == 30 and results["accuracy"] > 0.5 and results["loss"] < 1.0  # chance: 1/3, ln 3
    checkpoint = list_checkpoints(fsdp_run)[-1]
    assert checkpoint.name == "step_000020"
    # fsdp_state_dict_type FULL_STATE_DICT: the whole model and optimizer state, gathered on the first process
    # (a DDP run writes its weights once, in model/: see finetune.training.checkpoints.weights.keep_weights_once).
    state = {p.name for p in (checkpoint / "state").iterdir()}
    rng = {"random_states_0.pkl", "random_states_1.pkl"}
    assert state == {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.bin", *rng}
    assert_full_transformers_model(fsdp_run / "final")
    assert_full_transformers_model(checkpoint / "model")


@pytest.mark.recipe
@pytest.mark.multiprocess
def test_fsdp_kill_9_then_resume_equals_the_uninterrupted_run(fsdp_run, tiny_bert, toy_data, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, *SETTINGS)
    interrupt(args, PROCESSES, signal.SIGKILL, after_step=13, output_dir=output_dir)
    assert not (output_dir / "final").exists()
    assert json.loads((list_checkpoints(output_dir)[-1] / PROGRESS_FILE).read_text())["step"] == 10
    resumed = launch_fsdp(CLASSIFY, [*args, "train.resume_from=latest"])
    assert "resumed from" in resumed.stdout and "step_000010" in resumed.stdout
    assert_same_weights(fsdp_run, output_dir)


@pytest.mark.recipe
@pytest.mark.multiprocess
def test_llama_classifier_trains(tiny_llamas, toy_data, tmp_path):
    """LlamaForSequenceClassification from a tied-embedding checkpoint (its head is `score`, not tied)."""
    output_dir = tmp_path / "run"
    args = run_args(tiny_llamas["tied"], toy_data, output_dir, "train.max_steps=6", "checkpoint.every_n_steps=null")
    launch_fsdp(CLASSIFY, args)
    assert json.loads((output_dir / "eval_results.json").read_text())["step"] == 6
    assert_full_transformers_model(output_dir / "final")


@pytest.mark.multiprocess
def test_one_sharded_step_equals_the_unsharded_step(tiny_llamas, tiny_bert):
    """LlamaForCausalLM with tied and untied embeddings (the SFT case) and a BERT classifier whose fresh head
    the second process holds on the meta device until `prepare`."""
    specs = [f"causal:{tiny_llamas['tied']}", f"causal:{tiny_llamas['untied']}", f"classify:{tiny_bert}"]
    result = launch_fsdp(Path(__file__), specs)
    for spec in specs:
        assert result.stdout.count(f"same step: {spec}") == PROCESSES, result.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# The script: prepare each model with FSDP2, take one SGD step, compare with the unsharded model
# --------------------------------------------------------------------------------------------


def check_one_step(accelerator, spec: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune.core.fsdp import prepare_fsdp

    kind, path = spec.split(":", 1)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, **({} if kind == "causal" else {"num_labels": 3}))
    model.eval()  # no dropout: the sharded and unsharded forwards see the same network
    tied = model.config.tie_word_embeddings and model.get_output_embeddings() is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    prepare_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    full = partial(get_model_state_dict, options=StateDictOptions(full_state_dict=True))
    with torch.device("cpu"):
        reference = auto.from_config(model.config)
    reference.load_state_dict({name: t.cpu() for name, t in full(model).items()})
    reference.eval()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)

    rows, generator = 2 * accelerator.num_processes, torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, model.config.vocab_size, (rows, 12), generator=generator)
    labels = input_ids if kind == "causal" else torch.randint(0, 3, (rows,), generator=generator)
    batch = {"input_ids": input_ids, "labels": labels}
    share = slice(accelerator.process_index, None, accelerator.num_processes)
    mine = {name: t[share].to(accelerator.device) for name, t in batch.items()}
    accelerator.backward(model(**mine).loss)  # the mean over equal shares: gradients averaged over processes
    optimizer.step()
    reference(**batch).loss.backward()
    reference_optimizer.step()

    after = {name: t.cpu() for name, t in full(model).items()}
    expected = reference.state_dict()
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"same step: {spec}", flush=True)


if __name__ == "__main__":
    from accelerate import Accelerator

    accelerator = Accelerator()  # before from_pretrained: under FSDP it loads the fresh head on meta off rank 0
    for spec in sys.argv[1:]:
        check_one_step(accelerator, spec)
    accelerator.end_training()
