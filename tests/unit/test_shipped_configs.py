"""Every shipped YAML loads through the loader that will read it, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO

from finetune.core.config import config_to_dict, flatten, load_config, read_yaml
from finetune.core.schemas import ClassifyConfig, DPOConfig, SFTConfig

# recipes/configs/<recipe>/*.yaml -> the schema of recipes/<recipe>.py
RECIPE_SCHEMAS = {"classify": ClassifyConfig, "sft": SFTConfig, "dpo": DPOConfig}
RECIPE_YAMLS = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_YAMLS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def header_command(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path} must start with a comment giving the command that runs it"
    return first[2:]


def test_there_is_something_to_check():
    assert {p.parent.name for p in RECIPE_YAMLS} == set(RECIPE_SCHEMAS)
    names = {p.name for p in ACCELERATE_YAMLS}
    assert {
        "cpu.yaml",
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "fsdp.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "multi_node.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_config_loads_and_names_its_command(path: Path):
    recipe = path.parent.name
    cfg = load_config(RECIPE_SCHEMAS[recipe], ["--config", str(path)])
    assert isinstance(cfg, RECIPE_SCHEMAS[recipe])
    # Every value the file sets is the value the recipe runs with (none dropped, renamed or coerced to another).
    loaded = dict(flatten(config_to_dict(cfg)))
    written = dict(flatten(read_yaml(path)))
    assert written, f"{path} sets nothing"
    assert {key: loaded.get(key, "<not a key>") for key in written} == written
    command = header_command(path)
    assert command.startswith(f"accelerate launch recipes/{recipe}.py")
    if path.name != "default.yaml":  # default.yaml is what the recipe reads without --config
        assert f"--config {path.relative_to(REPO)}" in command


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_config_loads_in_accelerate(path: Path):
    config = load_config_from_file(str(path))
    assert config.distributed_type is not None
    command = header_command(path)
    assert "accelerate launch" in command and f"accelerate_configs/{path.name}" in command
    if config.distributed_type == "DEEPSPEED":
        # Batch geometry and clipping belong to the recipe config (filled in as "auto").
        assert config.deepspeed_config.get("gradient_accumulation_steps") is None
        assert config.deepspeed_config.get("gradient_clipping") is None
