"""Shared fixtures: tiny random models and tiny data written by the tests, all offline."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data is cached (finetune.core.token_cache): here in a dir of this test session, never the user's.
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-test-cache-"))


def pytest_configure(config) -> None:
    """Under pytest-xdist (`-n 2` in pyproject.toml), each worker owns one core, and so do the processes it
    launches: the recipe's default threads (cores / local processes) become 1, and two workers never fight
    over both cores (oversubscribed torch threads spin and run tiny models several times slower)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and len(cores) >= 2:
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        import torch

        torch.set_num_threads(1)


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so the next Accelerator in this process starts afresh (its
    gradient accumulation steps, mixed precision, device), as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


REPO = Path(__file__).resolve().parents[1]
CLASSIFY = REPO / "recipes" / "classify.py"

# A toy topic task: each text holds a few words of its class among filler words.
KEYWORDS = {"fruit": ["apple", "pear", "plum"], "vehicle": ["car", "bus", "truck"], "animal": ["dog", "cat", "cow"]}
FILLER = ["the", "a", "is", "red", "big", "old", "new", "one", "very", "on", "my", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def keyword_rows(n: int, seed: int = 0, labels: list[str] | None = None) -> list[dict]:
    """`n` rows {text, label} of the toy task, of varying length, classes in turn."""
    rng = random.Random(seed)
    names = labels or list(KEYWORDS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = rng.choices(KEYWORDS.get(label, ["[UNK]"]), k=rng.randint(2, 6)) + rng.choices(
            FILLER, k=rng.randint(0, 8)
        )
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .csv, .tsv, .json (a list), .jsonl or .parquet by the file's suffix."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        raise ValueError(suffix)
    return path


def make_tiny_bert(path: Path, max_positions: int = 64) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a word-level tokenizer for the toy task."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = SPECIAL + FILLER + [w for ws in KEYWORDS.values() for w in ws]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.model_max_length = max_positions
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """Train and validation CSVs of the toy task (validation size 37: uneven across 2 processes)."""
    root = tmp_path_factory.mktemp("toy_data")
    return {
        "train": write_rows(root / "train.csv", keyword_rows(240, seed=1)),
        "validation": write_rows(root / "validation.csv", keyword_rows(37, seed=2)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    script: Path,
    args: list[str],
    processes: int = 1,
    config_file: Path | None = None,
    launcher_args: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (and its environment) that runs `script` on CPU, as a user would.

    Without `config_file`: one CPU process, or `processes` CPU processes on gloo (`--multi_gpu` with
    ACCELERATE_USE_CPU, the way that starts several). With `config_file` (DeepSpeed): its own settings.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else "2"}
    launcher = ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    if config_file is not None:
        env["DS_ACCELERATOR"] = "cpu"
        launcher = ["--config_file", str(config_file), "--mixed_precision", "no", *launcher]
    elif processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        launcher = ["--multi_gpu", *launcher]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *launcher_args, str(script), *args]
    return cmd, env


def launch(
    script: Path,
    args: list[str],
    processes: int = 1,
    config_file: Path | None = None,
    launcher_args: tuple[str, ...] = (),
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run `script` through `accelerate launch` (see `launch_command`) to the end; the CompletedProcess."""
    cmd, env = launch_command(script, args, processes, config_file, launcher_args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_tensorboard_matches_metrics_log(run_dir: Path) -> None:
    """Every numeric value of the run's metrics.jsonl is in its TensorBoard event files at its step, and nothing
    else is (as TensorBoard reads them: records purged on resume do not count)."""
    import pytest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected: dict[str, list] = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                expected.setdefault(name, []).append((record["step"], value))
    assert sum(map(len, expected.values())) > 100
    assert logged.keys() == expected.keys()
    for name, points in expected.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        assert [v for _, v in logged[name]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), name
