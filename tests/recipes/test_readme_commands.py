"""The README's shell commands still work, as written.

Every command of README.md's ```bash blocks (each part of an `a && b` line on its own) is one of:
- quick: run here as written, in a fresh shell, and its output checked (`RUN`);
- training (`accelerate launch recipes/<recipe>.py ...` without --help or --dry-run): not trained here (minutes to
  hours), but its config, the recipe's YAML and the line's overrides, is resolved in-process, so a misspelt key or a
  bad value in the README fails;
- deliberately not run, with the reason (`NOT_RUN`).
A command that is none of these fails the test, so a new README command gets a decision here. So does a quick
command that left the README, and any file path the README names that does not exist.

    python -m pytest -q -p no:xdist -o addopts="" tests/recipes/test_readme_commands.py
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.recipe

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# Run as written: the command, and a line its output must hold.
RUN = {
    "accelerate launch recipes/classify.py --help": "usage: accelerate launch recipes/classify.py [--config PATH]",
    "accelerate launch recipes/classify.py train.lr=3e-5 train.epochs=3 output.dir=runs/bbc-lr3e-5 --dry-run": (
        "dry run: everything checked; nothing trained, nothing written"
    ),
    "accelerate launch recipes/sft.py --help": "usage: accelerate launch recipes/sft.py [--config PATH]",
    "accelerate launch recipes/sft.py --config recipes/configs/sft/demo.yaml --dry-run": "optimizer steps: 500",
    "accelerate launch recipes/sft.py --config recipes/configs/sft/demo.yaml model.quantization=nf4 lora.enabled=true "
    "train.optimizer=adamw_8bit --dry-run": "memory levers: nf4 base weights, double-quantized, LoRA r=8",
    "accelerate launch recipes/dpo.py --config recipes/configs/dpo/demo.yaml --dry-run": "optimizer steps: 100",
    "finetune-eval --help": "finetune-eval: score an exported model, a training checkpoint, or every model of a run",
    "finetune-plot --help": "usage: finetune-plot",
}

# Not run: how the command starts, and why.
NOT_RUN = {
    "pip install": "installs packages: .ci/run runs the quickstart's installs exactly as written",
    "pytest": "runs the test suite, this test included: .ci/run runs `pytest`",
    "finetune-eval runs/": "scores a finished run, which needs training first: tests/recipes/test_scoring.py does",
    "finetune-plot runs/": "plots finished runs: tests/unit/test_plots.py runs the command on written logs",
}

RECIPES = {"recipes/classify.py": "classify", "recipes/sft.py": "sft", "recipes/dpo.py": "dpo"}


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks, comments dropped, continued lines joined, `a && b` split."""
    commands, lines, fence, pending = [], README.read_text().splitlines(), None, ""
    for line in lines:
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence not in ("bash", "sh", "shell"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        part: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if part:
                    commands.append(" ".join(part))
                part = []
            else:
                part.append(word)
    return commands


def trains(command: str) -> bool:
    words = command.split()
    return (
        words[:2] == ["accelerate", "launch"]
        and any(w in RECIPES for w in words)
        and not ({"--help", "--dry-run"} & set(words))
    )


def not_run_reason(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def test_every_readme_command_is_run_resolved_or_deliberately_not_run():
    commands = readme_commands()
    assert len(commands) >= 10, commands
    unknown = [c for c in commands if c not in RUN and not trains(c) and not_run_reason(c) is None]
    assert not unknown, f"README commands this test does not know: add them to RUN or NOT_RUN: {unknown}"
    gone = [c for c in RUN if c not in commands]
    assert not gone, f"RUN names commands the README no longer shows: {gone}"
    assert any(trains(c) for c in commands), "the README shows no training command"


def test_training_commands_resolve_their_config(monkeypatch):
    """Each training command's YAML and overrides make a valid config (not trained: that takes minutes or more)."""
    from finetune.core.config import load_config
    from finetune.core.schemas import ClassifyConfig, DPOConfig, SFTConfig

    schemas = {"classify": ClassifyConfig, "sft": SFTConfig, "dpo": DPOConfig}
    resolved = 0
    for command in filter(trains, readme_commands()):
        words = command.split()
        script = next(w for w in words if w in RECIPES)
        recipe = RECIPES[script]
        args = words[words.index(script) + 1 :]
        monkeypatch.chdir(REPO)  # the README's paths are relative to the repository root
        cfg = load_config(schemas[recipe], args, REPO / "recipes" / "configs" / recipe / "default.yaml")
        assert cfg.output.dir, command
        resolved += 1
    assert resolved >= 3


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working dir that looks like the repository root (recipes/ and accelerate_configs/ linked), so the commands
    run as written, while what they write, and a finished run in the repository's runs/, stays out of the way."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("recipes", "accelerate_configs"):
        (root / name).symlink_to(REPO / name)
    return root


@pytest.mark.parametrize("command", list(RUN))
def test_readme_command_runs(command, scratch):
    assert command in readme_commands(), "the README no longer shows this command"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", command], cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{output[-3000:]}"
    assert RUN[command] in output, f"`{command}` did not print {RUN[command]!r}:\n{output[-3000:]}"


def test_paths_the_readme_names_exist():
    """Files and folders the README links to or names in backticks (run outputs and placeholders aside)."""
    text = README.read_text()
    named = re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`([\w./-]+/[\w./-]*)`", text)
    outputs = ("runs/", "final/", "checkpoints/", "logs/", "generations/", "model/", "state/")
    paths = {p for p in named if not p.startswith(("http", *outputs))}
    assert len(paths) >= 10, paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
