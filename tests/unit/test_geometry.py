"""finetune.core.geometry: the global batch as the knob, and `micro_batch_size: auto` under a simulated OOM and a
device memory limit (the recipe's own `auto` runs are in tests/recipes/test_batching.py)."""

from __future__ import annotations

import pytest
from helpers import reset_accelerate_state

from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.geometry import BatchGeometry, find_micro_batch_size, plan_batches
from finetune.core.schemas import TrainConfig
from finetune.training.launch import make_accelerator


def train_config(**values) -> TrainConfig:
    return build_config(TrainConfig, [("test", values)])


def test_global_batch_sets_the_accumulation_steps():
    assert plan_batches(train_config(micro_batch_size=8, gradient_accumulation_steps=3), 2) == BatchGeometry(8, 3, 2)
    assert plan_batches(train_config(micro_batch_size=8, global_batch_size=64), 2) == BatchGeometry(8, 4, 2)
    assert plan_batches(train_config(micro_batch_size=8, global_batch_size=64, gradient_accumulation_steps=4), 2)
    assert BatchGeometry(8, 4, 2).describe() == "effective batch 64 = micro-batch 8 x accumulation 4 x 2 process(es)"
    assert plan_batches(train_config(micro_batch_size="auto", global_batch_size=64), 2) is None


def test_impossible_geometries_are_config_errors():
    with pytest.raises(UserError, match="global_batch_size=60 is not divisible by train.micro_batch_size=8 x 2"):
        plan_batches(train_config(micro_batch_size=8, global_batch_size=60), 2)
    with pytest.raises(UserError, match="gradient_accumulation_steps=2 contradicts train.global_batch_size=64"):
        plan_batches(train_config(micro_batch_size=8, global_batch_size=64, gradient_accumulation_steps=2), 2)
    with pytest.raises(Exception, match="gradient_accumulation_steps.*must be >= 1"):
        train_config(gradient_accumulation_steps=0)


def oom_above(limit: int, tried: list[int]):
    def try_micro_batch(size: int, accumulation_steps: int) -> None:
        tried.append(size)
        if size > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    return try_micro_batch


@pytest.fixture
def accelerator():
    reset_accelerate_state()
    accelerator, _ = make_accelerator(train_config())
    return accelerator


def test_auto_takes_the_largest_divisor_that_fits(accelerator):
    tried: list[int] = []
    geometry = find_micro_batch_size(accelerator, 48, oom_above(10, tried))
    assert tried == [48, 24, 16, 12, 8]  # divisors of 48, largest first, until one fits
    assert geometry == BatchGeometry(8, 6, 1)


def test_auto_with_nothing_that_fits_says_what_to_change(accelerator):
    tried: list[int] = []
    with pytest.raises(UserError) as err:
        find_micro_batch_size(accelerator, 4, oom_above(0, tried))
    assert tried == [4, 2, 1]
    assert "no micro-batch fits" in str(err.value)
    assert "(tried 4 (out of memory), 2 (out of memory), 1 (out of memory))" in str(err.value)
    assert "data.max_length" in str(err.value) and "gradient_checkpointing" in str(err.value)


def test_other_errors_are_not_taken_for_out_of_memory(accelerator):
    def broken(size: int, accumulation_steps: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_micro_batch_size(accelerator, 8, broken)


class PeakPerExample:
    """A device whose peak is 10 units per example, against a limit of 100."""

    def __init__(self):
        self.size = 0

    def reset_peak(self):
        self.size = 0

    def peak(self):
        return 10 * self.size

    def limit(self):
        return 100


def test_auto_keeps_a_margin_below_the_device_limit(accelerator):
    memory = PeakPerExample()

    def rehearse(size: int, accumulation_steps: int) -> None:
        memory.size = size

    # 10 examples would peak at exactly the limit (no OOM), but leave nothing for fragmentation: 9 x 10 > 85.
    geometry = find_micro_batch_size(accelerator, 40, rehearse, memory)
    assert geometry == BatchGeometry(8, 5, 1)
