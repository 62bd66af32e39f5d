"""`micro_batch_size: auto` through the recipe: shrinking the micro-batch on a real out-of-memory error, and
refused without a global batch. (Batch geometry itself: tests/unit/test_geometry.py.)"""

from __future__ import annotations

import json

import torch
from helpers import CLASSIFY, recipe_main, reset_accelerate_state, run_bad, toy_args


def test_recipe_shrinks_the_micro_batch_on_a_real_oom_error(tiny_bert, toy_data, tmp_path, capsys, monkeypatch):
    """The recipe end to end, its model raising PyTorch's out-of-memory error above 4 examples."""
    from transformers import BertForSequenceClassification

    forward = BertForSequenceClassification.forward

    def forward_with_little_memory(self, input_ids=None, **kwargs):
        if input_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated on CPU)")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward_with_little_memory)
    reset_accelerate_state()
    out = tmp_path / "out"
    args = toy_args(tiny_bert, toy_data, out, "train.micro_batch_size=auto", "train.global_batch_size=16")
    args = [a for a in args if not a.startswith("train.gradient_accumulation_steps")]
    args += ["train.max_steps=3", "eval.batch_size=4"]  # evaluation must fit too
    recipe_main()(args)
    assert "effective batch 16 = micro-batch 4 x accumulation 4 x 1 process(es)" in capsys.readouterr().out
    assert json.loads((out / "eval_results.json").read_text())["step"] == 3
    reset_accelerate_state()


def test_auto_without_a_global_batch_is_refused(tiny_bert, toy_data, tmp_path, capsys):
    err = run_bad(toy_args(tiny_bert, toy_data, tmp_path / "o", "train.micro_batch_size=auto"), capsys)
    assert "train.micro_batch_size=auto needs train.global_batch_size" in err
    assert CLASSIFY.exists()
