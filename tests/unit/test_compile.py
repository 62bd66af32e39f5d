"""train.compile=true, in one process: the same gradients as eager mode, accumulation included. (Length buckets, the
static shapes compiled runs train on: tests/unit/test_buckets.py; the compiled recipe run, graphs bounded and bitwise
resume: tests/recipes/test_compile.py.)"""

from __future__ import annotations

import copy

import torch
from helpers import reset_accelerate_state
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.classify.model import classification_loss
from finetune.core.buckets import LengthBuckets
from finetune.training.accumulation import count_label_terms, windows


def test_compiled_window_gradient_equals_one_eager_batch(tiny_bert):
    """An accumulation window of 2 bucketed micro-batches through the inductor-compiled model gives the gradient
    of one eager batch of all 8 examples (dynamic padding): compile changes neither the loss nor exactness.
    (One layer and one bucket: one graph to compile, the one inductor compile of the suite.) It runs in a fresh
    process: compiling changes process-wide state (a bf16 recipe run in the same process after it trained to
    other numbers), which in-process tests after it would inherit."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(compiled_vs_eager_gradients, (tiny_bert,))


def compiled_vs_eager_gradients(tiny_bert) -> None:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    torch.manual_seed(0)
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, num_hidden_layers=1)
    eager.config.hidden_dropout_prob = eager.config.attention_probs_dropout_prob = 0.0
    eager.eval()  # no dropout: the two runs see the same function
    compiled_model = copy.deepcopy(eager)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = [3, 9, 5, 12, 10, 4, 7, 2]
    features = [
        {"input_ids": [2] + [5 + (i + j) % 8 for j in range(n)] + [3], "labels": i % 3} for i, n in enumerate(lengths)
    ]
    buckets = LengthBuckets.up_to(32, batch_size=4)
    micro_batches = [
        padding_collator(tokenizer, buckets=buckets)(features[:4]),
        padding_collator(tokenizer, buckets=buckets)(features[4:]),
    ]
    assert [tuple(b["input_ids"].shape) for b in micro_batches] == [(4, 16), (4, 16)]

    reset_accelerate_state()
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=2, sync_with_dataloader=False),
        dynamo_backend="inductor",
    )
    compiled_model = accelerator.prepare(compiled_model)
    window = next(windows(accelerator, micro_batches, count_label_terms))
    for batch in window.batches:
        with accelerator.accumulate(compiled_model):
            accelerator.backward(window.normalise(classification_loss(compiled_model, batch)))

    whole = padding_collator(tokenizer)(features)
    (classification_loss(eager, whole) / len(features)).backward()
    compiled_grads = dict(accelerator.unwrap_model(compiled_model, keep_torch_compile=False).named_parameters())
    for name, param in eager.named_parameters():
        torch.testing.assert_close(compiled_grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
