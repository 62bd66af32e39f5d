"""What only a GPU can show: fp16 autocast with its gradient scaler, bf16 autocast, `auto` under a memory cap,
and exact resume on the GPU. Skipped (with the reason listed) where there is no CUDA GPU; on a GPU machine
`pytest -m gpu` runs them, and benchmarks/gpu_check.py runs them with the rest of the GPU checks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import recipe_main, reset_accelerate_state, stored_dtypes, toy_args
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs it)"
)


@pytest.fixture(autouse=True)
def fresh_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.mark.parametrize(("stored", "mixed_precision"), [("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "bf16")])
def test_half_precision_checkpoints_learn_under_gpu_autocast(stored, mixed_precision, half_berts, toy_data, tmp_path):
    out = tmp_path / "out"
    recipe_main()(toy_args(half_berts[stored], toy_data, out, f"train.mixed_precision={mixed_precision}"))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] > 0.9 and results["warnings"] == []
    assert stored_dtypes(out / "final") == {"F32"}


def test_auto_fits_under_a_memory_cap_and_training_never_runs_out(tiny_bert, toy_data, tmp_path, capsys):
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total))  # 2 GiB
    try:
        out = tmp_path / "out"
        args = toy_args(tiny_bert, toy_data, out, "train.micro_batch_size=auto", "train.global_batch_size=16")
        recipe_main()([a for a in args if not a.startswith("train.gradient_accumulation_steps")])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    log = capsys.readouterr().out
    assert re.search(r"micro-batch \d+ x accumulation", log) and "out of memory" not in log
    assert torch.cuda.max_memory_reserved() <= 2 * 2**30


def test_resume_on_the_gpu_is_exact(tiny_bert, toy_data, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe_main()(toy_args(tiny_bert, toy_data, full, "train.max_steps=30", "checkpoint.every_n_steps=10"))
    reset_accelerate_state()
    checkpoint = full / "checkpoints" / "step_000020"
    recipe_main()(toy_args(tiny_bert, toy_data, resumed, "train.max_steps=30", f"train.resume_from={checkpoint}"))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
