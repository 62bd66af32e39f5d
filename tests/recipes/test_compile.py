"""train.compile=true: static shapes (length buckets), graphs bounded and compiled in the first epoch, the
same losses and gradients as eager mode, exact accumulation and bitwise resume with compile on."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import read_jsonl, reset_accelerate_state
from test_checkpoints import assert_same_weights, run_args, run_to_end
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune.classify.collate import padding_collator
from finetune.classify.model import classification_loss
from finetune.core.compile import LengthBuckets
from finetune.lm.collate import SFTCollator
from finetune.training.accumulation import IGNORE_INDEX, count_label_terms, windows
from finetune.training.checkpoints.layout import CHECKPOINTS_DIR


def test_buckets_are_powers_of_two_up_to_max_length_and_a_short_batch_gets_the_longest():
    buckets = LengthBuckets.up_to(100, batch_size=8)
    assert buckets.lengths == (16, 32, 64, 100) and buckets.shapes == 5
    assert [buckets.width(n, 8) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
    assert buckets.width(3, 5) == 100  # the epoch's short last batch: one shape, whatever its lengths
    assert LengthBuckets.up_to(16, 4).lengths == (16,)
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        buckets.width(101, 8)


def test_collators_pad_to_the_bucket(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    buckets = LengthBuckets.up_to(64, batch_size=2)
    features = [{"input_ids": [2, 5, 3], "labels": 1}, {"input_ids": [2, 5, 6, 7, 3], "labels": 0}]
    batch = padding_collator(tokenizer, buckets=buckets)(features)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum().item() == 8
    assert padding_collator(tokenizer, buckets=buckets)(features[:1])["input_ids"].shape == (1, 64)
    sft = SFTCollator(pad_token_id=0, buckets=buckets)([{"input_ids": [1] * 20, "labels": [1] * 20}] * 2)
    assert sft["input_ids"].shape == (2, 32) and (sft["labels"][:, 20:] == IGNORE_INDEX).all()


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


@pytest.mark.recipe
def test_compiled_run_keeps_its_graphs_from_the_first_epoch_and_resumes_bitwise(tiny_bert, toy_data, tmp_path):
    """2 epochs of 30 steps (micro-batch 4 x accumulation 2), aot_eager, max length 16 (one bucket): every graph
    is compiled in epoch 1 (train and eval shapes: at most 2 x (1 bucket + the short batch)), and a run resumed
    from the step-20 checkpoint ends bitwise equal to the uninterrupted one."""
    compiled = [
        "train.compile=true",
        "train.compile_backend=aot_eager",
        "data.max_length=16",
        "train.epochs=2",
        "checkpoint.keep_last=5",
    ]
    full = tmp_path / "full"
    run_to_end(run_args(tiny_bert, toy_data, full, *compiled))
    graphs = {r["step"]: r["compiled_graphs"] for r in read_jsonl(full / "metrics.jsonl") if "compiled_graphs" in r}
    assert 0 < graphs[30] == graphs[60] <= 2 * LengthBuckets.up_to(16, 4).shapes, graphs
    results = json.loads((full / "eval_results.json").read_text())
    assert results["step"] == 60 and results["accuracy"] > 0.5

    resumed = tmp_path / "resumed"
    shutil.copytree(full / CHECKPOINTS_DIR / "step_000020", resumed / CHECKPOINTS_DIR / "step_000020")
    run_to_end([*run_args(tiny_bert, toy_data, resumed, *compiled), "train.resume_from=latest"])
    assert_same_weights(full, resumed)
