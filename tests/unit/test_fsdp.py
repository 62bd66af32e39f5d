"""finetune.core.fsdp, in one process: the adjustments before `accelerator.prepare` (the wrap policy, meta
parameters). FSDP2 runs on 2 processes are in tests/distributed/test_fsdp.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from helpers import tiny_llama_config

from finetune.core.fsdp import fit_wrap_policy, materialize_meta_parameters


def test_wrap_policy_leaves_out_blocks_that_hold_the_embeddings(monkeypatch):
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy
    from transformers import BertConfig, BertForSequenceClassification, LlamaForCausalLM

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1))
    assert set(bert._no_split_modules) == {"BertEmbeddings", "BertLayer"}  # what made Accelerate shard twice
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    assert fit_wrap_policy(plugin, bert) == ["BertLayer"] == plugin.transformer_cls_names_to_wrap
    llama = LlamaForCausalLM(tiny_llama_config(vocab_size=40, tie_word_embeddings=True))
    assert fit_wrap_policy(plugin, llama) == ["LlamaDecoderLayer"]
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BertEmbeddings,BertLayer")  # from the config file
    assert fit_wrap_policy(plugin, bert) == ["BertLayer"]
    plugin.auto_wrap_policy = size_based_auto_wrap_policy
    assert fit_wrap_policy(plugin, bert) is None


def test_meta_parameters_get_storage_of_their_own_in_place():
    with torch.device("meta"):
        head = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(head.parameters())
    weight, bias = head.weight, head.bias
    assert weight.data_ptr() == bias.data_ptr() == 0  # how Accelerate's optimizer mapping merged them
    assert materialize_meta_parameters(head) == ["weight", "bias"]
    assert head.weight is weight and head.bias is bias and optimizer.param_groups[0]["params"] == [weight, bias]
    assert weight.device.type == "cpu" and weight.shape == (3, 4) and weight.data_ptr() != bias.data_ptr()
    assert materialize_meta_parameters(head) == []
