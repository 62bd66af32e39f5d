"""What only a GPU can show: fp16 autocast with its gradient scaler, bf16 autocast, `auto` under a memory cap,
exact resume on the GPU, activation offload, and QLoRA with paged 8-bit AdamW.
Skipped (with the reason listed) where there is no CUDA GPU; on a GPU machine
`pytest -m gpu` runs them, and benchmarks/gpu_check.py runs them with the rest of the GPU checks."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from helpers import recipe_main, reset_accelerate_state, stored_dtypes, toy_args
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs it)"
)


@pytest.fixture(autouse=True)
def fresh_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.mark.parametrize(("stored", "mixed_precision"), [("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "bf16")])
def test_half_precision_checkpoints_learn_under_gpu_autocast(stored, mixed_precision, half_berts, toy_data, tmp_path):
    out = tmp_path / "out"
    recipe_main()(toy_args(half_berts[stored], toy_data, out, f"train.mixed_precision={mixed_precision}"))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] > 0.9 and results["warnings"] == []
    assert stored_dtypes(out / "final") == {"F32"}


def test_auto_fits_under_a_memory_cap_and_training_never_runs_out(tiny_bert, toy_data, tmp_path, capsys):
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total))  # 2 GiB
    try:
        out = tmp_path / "out"
        args = toy_args(tiny_bert, toy_data, out, "train.micro_batch_size=auto", "train.global_batch_size=16")
        recipe_main()([a for a in args if not a.startswith("train.gradient_accumulation_steps")])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    log = capsys.readouterr().out
    assert re.search(r"micro-batch \d+ x accumulation", log) and "out of memory" not in log
    assert torch.cuda.max_memory_reserved() <= 2 * 2**30


def test_resume_on_the_gpu_is_exact(tiny_bert, toy_data, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe_main()(toy_args(tiny_bert, toy_data, full, "train.max_steps=30", "checkpoint.every_n_steps=10"))
    reset_accelerate_state()
    checkpoint = full / "checkpoints" / "step_000020"
    recipe_main()(toy_args(tiny_bert, toy_data, resumed, "train.max_steps=30", f"train.resume_from={checkpoint}"))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_activation_offload_gives_the_same_gradients_in_less_gpu_memory():
    """Saved activations go to pinned host memory and come back in backward: bitwise the same gradients, a lower
    peak (4 layers, 8 x 512 tokens: every saved activation is over finetune.core.offload.MIN_OFFLOAD_BYTES)."""
    from helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    from finetune.core.offload import with_activation_offload
    from finetune.lm.loss import next_token_loss

    torch.manual_seed(0)
    config = tiny_llama_config(
        1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, max_position_embeddings=512
    )
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 1000, (8, 512), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    peaks, grads = {}, {}
    for offload in (False, True):
        loss_fn = with_activation_offload(next_token_loss) if offload else next_token_loss
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model, batch).backward()
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated()
        grads[offload] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    assert peaks[True] < 0.8 * peaks[False], peaks


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs .[quant] (memory_levers.py --gpu)")
def test_qlora_with_paged_8bit_adamw_and_offload_trains_on_the_gpu(tiny_lm, chat_data, tmp_path):
    """QLoRA (nf4, bf16 compute), paged 8-bit AdamW and activation offload together: the loss falls, final/ is the
    adapter merged onto the dequantized base, within bf16's rounding of the quantized model with its adapter."""
    from helpers import SFT, read_jsonl, sft_args

    out = tmp_path / "qlora"
    levers = ["lora.enabled=true", "model.quantization=nf4", "train.optimizer=paged_adamw_8bit"]
    levers += ["train.activation_offload=true", "train.gradient_checkpointing=true", "train.mixed_precision=bf16"]
    recipe_main(SFT)(sft_args(tiny_lm, chat_data, out, *levers, "train.epochs=3", "train.lr=1e-2"))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4])
    gap = json.loads((out / "eval_results.json").read_text())["merged_model"]
    assert gap["max_logit_difference"] < 0.05 * gap["max_abs_logit"] + 0.05, gap
