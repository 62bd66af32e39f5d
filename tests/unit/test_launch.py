"""finetune.training.launch: the recipe's mixed precision against the launcher's, and DeepSpeed's batch geometry
and clipping filled from the recipe or refused where they contradict it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.core.errors import UserError
from finetune.core.geometry import BatchGeometry
from finetune.training.launch import check_mixed_precision, reconcile_deepspeed


def test_mixed_precision_recipe_vs_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert check_mixed_precision("bf16") == "bf16"  # plain `python recipe.py`: the recipe decides
    assert check_mixed_precision(None) is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert check_mixed_precision("bf16") == "bf16"
    assert check_mixed_precision(None) is None  # Accelerate reads the launcher's value
    with pytest.raises(UserError, match="train.mixed_precision=fp16 .* conflicts with mixed precision 'bf16'"):
        check_mixed_precision("fp16")


def fake_deepspeed(ds_config: dict, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config, gradient_accumulation_steps="auto")
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes), plugin


def test_deepspeed_auto_values_are_filled_from_the_recipe():
    accelerator, plugin = fake_deepspeed(
        {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    )
    reconcile_deepspeed(accelerator, BatchGeometry(4, 3, 2), max_grad_norm=1.0)
    assert plugin.deepspeed_config == {
        "train_batch_size": 24,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 1.0,
    }
    assert plugin.gradient_accumulation_steps == 3


def test_deepspeed_values_that_contradict_the_recipe_are_all_named():
    accelerator, _ = fake_deepspeed(
        {"train_batch_size": 64, "gradient_accumulation_steps": 8, "gradient_clipping": 1.0}
    )
    with pytest.raises(UserError) as err:
        reconcile_deepspeed(accelerator, BatchGeometry(4, 2, 2), max_grad_norm=1.0)
    text = str(err.value)
    assert "DeepSpeed `gradient_accumulation_steps` is 8, but the recipe gives 2" in text
    assert "DeepSpeed `train_batch_size` is 64, but the recipe gives 16" in text
    assert "gradient_clipping" not in text  # agrees with train.max_grad_norm


class Untouchable:
    """An object whose every attribute read or write fails the test, but for the attributes it is given."""

    def __init__(self, **given):
        object.__setattr__(self, "given", given)

    def __getattr__(self, name: str):
        if name in self.given:
            return self.given[name]
        raise AssertionError(f"read .{name}")

    def __setattr__(self, name: str, value) -> None:
        raise AssertionError(f"wrote .{name} = {value!r}")


def test_no_deepspeed_is_left_alone():
    """Without DeepSpeed there is no DeepSpeed config: nothing is read but the missing plugin, nothing written,
    not even with a geometry and a clipping value that a DeepSpeed config would have to take."""
    accelerator = Untouchable(state=Untouchable(deepspeed_plugin=None))
    assert reconcile_deepspeed(accelerator, BatchGeometry(4, 3, 2), max_grad_norm=1.0) is None
