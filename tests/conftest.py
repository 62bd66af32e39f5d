"""Fixtures shared across the tiers (tiny random models, tiny data, all offline), and the tiers themselves:
every test under tests/recipes is marked `recipe`, under tests/distributed `multiprocess`, under tests/gpu `gpu` and
`recipe` (by folder, below, so that a new test cannot forget its marker). The builders are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import (
    chats,
    keyword_rows,
    make_tiny_bert,
    make_tokenizer,
    preference_pairs,
    tiny_llama_config,
    write_rows,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data is cached (finetune.core.token_cache): here in a dir of this test session, never the user's.
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-test-cache-"))

TESTS = Path(__file__).resolve().parent
# tests/gpu runs recipes too: `-m "not recipe and not multiprocess"` is then exactly tests/unit.
TIER_MARKERS = {"recipes": ("recipe",), "distributed": ("multiprocess",), "gpu": ("gpu", "recipe")}


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


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """The tier's marker on every test of tests/recipes, tests/distributed and tests/gpu."""
    for item in items:
        try:
            tier = item.path.relative_to(TESTS).parts[0]
        except ValueError:  # a test outside tests/ (none today)
            continue
        for marker in TIER_MARKERS.get(tier, ()):
            item.add_marker(marker)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32, random weights) and a word-level tokenizer of the toy task's words."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def half_berts(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT saved with bf16 and with fp16 weights, as most Hub checkpoints are stored today."""
    import torch
    from transformers import AutoModelForSequenceClassification

    paths = {}
    torch.manual_seed(0)  # the new classification head's init: not whatever RNG state earlier tests left behind
    for name, dtype in {"bf16": torch.bfloat16, "fp16": torch.float16}.items():
        path = tmp_path_factory.mktemp(f"tiny_bert_{name}")
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).to(dtype).save_pretrained(path)
        for file in tiny_bert.iterdir():  # the tokenizer
            if file.name not in ("config.json", "model.safetensors"):
                shutil.copy(file, path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """The tiny LLaMA's config (no weights: recipes/sft.py runs it with model.random_init) with 128 positions,
    and the character tokenizer with a chat template."""
    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(path)
    tiny_llama_config(len(tokenizer), tokenizer, max_position_embeddings=128).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Tiny data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """Train and validation CSVs of the toy task (validation size 37: uneven across 2 processes)."""
    root = tmp_path_factory.mktemp("toy_data")
    return {
        "train": write_rows(root / "train.csv", keyword_rows(240, seed=1)),
        "validation": write_rows(root / "validation.csv", keyword_rows(37, seed=2)),
    }


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> dict[str, Path]:
    """Reverse-a-word preference pairs: 48 for training, 12 for validation (JSONL, explicit chat prompts)."""
    root = tmp_path_factory.mktemp("pair_data")
    return {
        "train": write_rows(root / "train.jsonl", preference_pairs(48, seed=0)),
        "validation": write_rows(root / "validation.jsonl", preference_pairs(12, seed=1)),
    }


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """Reverse-a-word chats: 48 for training, 12 for validation (JSONL, `messages`)."""
    root = tmp_path_factory.mktemp("chat_data")
    return {
        "train": write_rows(root / "train.jsonl", chats(48, seed=0)),
        "validation": write_rows(root / "validation.jsonl", chats(12, seed=1)),
    }
