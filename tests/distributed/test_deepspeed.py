"""DeepSpeed ZeRO through Accelerate on CPU (DeepSpeed's CPU accelerator, gloo): same training as without it.

DeepSpeed compiles C++ ops at first use (minutes each on 2 cores); these tests build none: the shared-memory
all-reduce is left out by the recipe (`finetune.training.launch.skip_deepspeed_shm_comm`), and ZeRO-3 offload runs
with the recipe's torch AdamW instead of DeepSpeedCPUAdam (`with_torch_adamw`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CLASSIFY, REPO, launch
from safetensors.torch import load_file

# The test extra installs DeepSpeed and CI must run these tests; elsewhere (a GPU image without it) they skip.
if os.environ.get("CI") == "true":
    import deepspeed  # noqa: F401
else:
    pytest.importorskip("deepspeed")

CONFIGS = REPO / "accelerate_configs"


def toy_args(tiny_bert, toy_data, output_dir, micro_batch_size: int) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=1",
        f"train.micro_batch_size={micro_batch_size}",
        "train.gradient_accumulation_steps=2",
        "train.lr=3e-3",
        "eval.batch_size=8",
        f"output.dir={output_dir}",
    ]


def eval_results(output_dir) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def plain_runs(tiny_bert, toy_data, tmp_path_factory):
    """The run without DeepSpeed that ZeRO must match, with 1 or 2 processes: each trained once for the module."""
    runs: dict[int, Path] = {}

    def run(processes: int) -> Path:
        if processes not in runs:
            output_dir = tmp_path_factory.mktemp(f"plain_{processes}") / "run"
            result = launch(CLASSIFY, toy_args(tiny_bert, toy_data, output_dir, 8 // processes), processes=processes)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[processes] = output_dir
        return runs[processes]

    return run


def with_torch_adamw(shipped: Path, root: Path) -> Path:
    """The shipped Accelerate config with its DeepSpeed settings moved to a DeepSpeed config file, unchanged, plus
    `zero_force_ds_cpu_optimizer: false`. ZeRO-3 still offloads the weights and AdamW's state to CPU RAM, and steps
    them with the recipe's torch AdamW, where the shipped file has Accelerate swap in DeepSpeedCPUAdam: DeepSpeed's own
    C++ op (its numerics are DeepSpeed's to test), compiled at first use in about 3.5 minutes on 2 cores."""
    accelerate_config = yaml.safe_load(shipped.read_text())
    settings = accelerate_config["deepspeed_config"]
    assert set(settings) == {
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "zero3_init_flag",
        "zero3_save_16bit_model",
    }, f"{shipped.name} has other DeepSpeed settings now: carry them over here"
    deepspeed_config = {  # what Accelerate builds from those settings, with "auto" for the recipe to fill
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": settings["zero_stage"],
            "offload_optimizer": {"device": settings["offload_optimizer_device"]},
            "offload_param": {"device": settings["offload_param_device"]},
            "stage3_gather_16bit_weights_on_model_save": settings["zero3_save_16bit_model"],
        },
        "zero_force_ds_cpu_optimizer": False,
    }
    (json_file := root / "deepspeed.json").write_text(json.dumps(deepspeed_config))
    accelerate_config["deepspeed_config"] = {
        "deepspeed_config_file": str(json_file),
        "zero3_init_flag": settings["zero3_init_flag"],
    }
    (config_file := root / shipped.name).write_text(yaml.safe_dump(accelerate_config))
    return config_file


@pytest.mark.parametrize(
    ("config", "processes", "tolerance"),
    [
        ("deepspeed_zero2.yaml", 1, 1e-4),
        ("deepspeed_zero3.yaml", 2, 1e-4),
        ("deepspeed_zero3_offload.yaml", 1, 1e-4),  # with torch AdamW: see with_torch_adamw
    ],
)
def test_zero_trains_like_plain_data_parallel(
    config, processes, tolerance, plain_runs, tiny_bert, toy_data, tmp_path, monkeypatch
):
    micro = 8 // processes  # same global batches in both runs
    plain = plain_runs(processes)
    config_file = CONFIGS / config
    if "offload" in config:
        config_file = with_torch_adamw(config_file, tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions := tmp_path / "torch_extensions"))
    zero = launch(
        CLASSIFY,
        toy_args(tiny_bert, toy_data, tmp_path / "zero", micro),
        processes=processes,
        config_file=config_file,
    )
    assert zero.returncode == 0, zero.stderr[-3000:]
    # Each op DeepSpeed compiles costs minutes of every CI run; none is needed to train.
    assert not extensions.exists() or not any(extensions.iterdir()), list(extensions.iterdir())
    assert "effective batch 16" in zero.stdout
    assert (tmp_path / "zero" / "final" / "model.safetensors").is_file()
    got, want = eval_results(tmp_path / "zero"), eval_results(plain)
    assert got["step"] == want["step"] == 15
    assert got["loss"] == pytest.approx(want["loss"], rel=tolerance)


def test_deepspeed_setting_that_contradicts_the_recipe_is_refused(tiny_bert, toy_data, tmp_path):
    result = launch(
        CLASSIFY,
        toy_args(tiny_bert, toy_data, tmp_path / "out", 8),
        config_file=CONFIGS / "deepspeed_zero2.yaml",
        launcher_args=("--gradient_accumulation_steps", "4"),
    )
    assert result.returncode != 0
    assert "DeepSpeed `gradient_accumulation_steps` is 4, but the recipe gives 2" in result.stderr
    assert "DeepSpeed `train_batch_size`" not in result.stderr  # 'auto' values are filled, not reported
    assert not (tmp_path / "out").exists()


def test_zero2_resumes_from_a_checkpoint_bitwise(tiny_bert, toy_data, tmp_path):
    """Under DeepSpeed the engine saves model and optimizer; the LR scheduler is saved beside (see
    finetune.training.checkpoints.layout.SCHEDULER_FILE). A run resumed from its step-10 checkpoint ends bitwise
    equal."""
    config = CONFIGS / "deepspeed_zero2.yaml"
    checkpointing = ["train.epochs=2", "checkpoint.every_n_steps=10", "checkpoint.keep_last=5"]
    full = tmp_path / "full"
    result = launch(CLASSIFY, [*toy_args(tiny_bert, toy_data, full, 8), *checkpointing], config_file=config)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_000010", resumed / "checkpoints" / "step_000010")
    args = [*toy_args(tiny_bert, toy_data, resumed, 8), *checkpointing, "train.resume_from=latest"]
    result = launch(CLASSIFY, args, config_file=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_zero3_dry_run_estimates_sharded_memory_without_a_collective(tiny_bert, toy_data, tmp_path):
    """Under ZeRO-3 transformers builds models through deepspeed.zero.Init, a collective: the dry run builds its
    meta model on the main process alone, and divides weights, gradients and optimizer state by the processes."""
    out = tmp_path / "out"
    args = [*toy_args(tiny_bert, toy_data, out, 8), "--dry-run"]
    result = launch(CLASSIFY, args, processes=2, config_file=CONFIGS / "deepspeed_zero3.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launch: 2 process(es) (DeepSpeed, zero3)" in result.stdout
    assert "zero3 over 2 processes: weights / 2, gradients / 2, optimizer state / 2" in result.stdout
    assert "effective batch 32 = micro-batch 8 x accumulation 2 x 2 process(es)" in result.stdout
    assert not out.exists()
