"""train.compile=true through the recipe: graphs bounded and compiled in the first epoch, bitwise resume with
compile on. (Length buckets and compiled-vs-eager gradients: tests/unit/test_compile.py.)"""

from __future__ import annotations

import json
import shutil

from helpers import assert_same_weights, read_jsonl, run_args, run_to_end

from finetune.core.buckets import LengthBuckets
from finetune.training.checkpoints.layout import CHECKPOINTS_DIR


def test_compiled_run_keeps_its_graphs_from_the_first_epoch_and_resumes_bitwise(tiny_bert, toy_data, tmp_path):
    """2 epochs of 30 steps (micro-batch 4 x accumulation 2), aot_eager, max length 16 (one bucket): every graph
    is compiled in epoch 1 (train and eval shapes: at most 2 x (1 bucket + the short batch)), and a run resumed
    from the step-20 checkpoint ends bitwise equal to the uninterrupted one."""
    compiled = [
        "train.compile=true",
        "train.compile_backend=aot_eager",
        "data.max_length=16",
        "train.epochs=2",
        "checkpoint.keep_last=5",
    ]
    full = tmp_path / "full"
    run_to_end(run_args(tiny_bert, toy_data, full, *compiled))
    graphs = {r["step"]: r["compiled_graphs"] for r in read_jsonl(full / "metrics.jsonl") if "compiled_graphs" in r}
    assert 0 < graphs[30] == graphs[60] <= 2 * LengthBuckets.up_to(16, 4).shapes, graphs
    results = json.loads((full / "eval_results.json").read_text())
    assert results["step"] == 60 and results["accuracy"] > 0.5

    resumed = tmp_path / "resumed"
    shutil.copytree(full / CHECKPOINTS_DIR / "step_000020", resumed / CHECKPOINTS_DIR / "step_000020")
    run_to_end([*run_args(tiny_bert, toy_data, resumed, *compiled), "train.resume_from=latest"])
    assert_same_weights(full, resumed)
