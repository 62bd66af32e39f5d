"""finetune.core.quantization, finetune.core.offload and finetune.training.levers, in one process, CPU-checked:
bitsandbytes 4-bit and 8-bit layers run on x86 CPUs. (The recipes with QLoRA: tests/recipes/test_qlora.py;
activation offload, which needs a GPU: tests/gpu/test_gpu.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from helpers import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config

from finetune.core import quantization
from finetune.core.errors import UserError
from finetune.core.memory import materialise_optimizer_state
from finetune.core.modeling import apply_lora, build_skeleton, skip_unquantized
from finetune.core.offload import offloadable, with_activation_offload
from finetune.core.optim import build_optimizer
from finetune.core.schemas import LoraConfig
from finetune.plan.memory_estimate import optimizer_state_bytes, quantized_bytes
from finetune.training.levers import check_levers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs .[quant]")


def quantized_llama(tmp_path, kind: str, seed: int = 0):
    """The tests' tiny LLaMA (hidden 64: 4-bit blocks of 64 fill) saved with random weights, loaded quantized as the
    recipes load it."""
    config = tiny_llama_config(100, hidden_size=64, intermediate_size=128)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    settings = SimpleNamespace(quantization=kind, double_quant=True)
    loading = quantization.loading_kwargs(settings, "no", "fp32", "cpu", [])
    skip_unquantized(loading, build_skeleton(config, AutoModelForCausalLM))
    return quantization.keep_training_numerics(AutoModelForCausalLM.from_pretrained(tmp_path, **loading))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_onto_the_dequantized_base_gives_the_adapter_models_logits(tmp_path, kind):
    model = quantized_llama(tmp_path, kind)
    assert quantization.is_quantized(model) and model.lm_head.weight.dtype == torch.float32  # the output layer kept
    peft_model = apply_lora(model, LoraConfig(enabled=True), "CAUSAL_LM")
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is zero at the start
            param.data.normal_(0, 0.5)
    peft_model.eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = quantization.plain_model_from(peft_model, torch.float32)
        plain = merged(input_ids=ids).logits
    assert not quantization.is_quantized(merged) and "quantization_config" not in merged.config.to_dict()
    # nf4: the same weights, another order of additions; int8 also quantizes the activations (LLM.int8 matmul)
    assert (adapted - plain).abs().max() < (1e-4 if kind == "nf4" else 5e-2)
    assert (adapted - plain).abs().max() < 0.1 * adapted.abs().max()


def test_merging_onto_the_original_weights_adds_the_quantization_error_back(tmp_path):
    """Why the merge dequantizes: the adapter was trained against the quantized weights."""
    model = quantized_llama(tmp_path, "nf4")
    original = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    peft_model = apply_lora(model, LoraConfig(enabled=True), "CAUSAL_LM")
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        adapted = peft_model.eval()(input_ids=ids).logits  # B = 0: the merge is the base alone
        onto_dequantized = quantization.plain_model_from(peft_model, torch.float32)(input_ids=ids).logits
        onto_original = original(input_ids=ids).logits
    assert (adapted - onto_dequantized).abs().max() * 100 < (adapted - onto_original).abs().max()


def test_the_head_and_output_layer_stay_unquantized_and_trainable():
    bert = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    skeleton = build_skeleton(bert, AutoModelForSequenceClassification)
    assert "classifier" in quantization.unquantized_modules(skeleton)
    assert "classifier" not in quantization.quantizable_linears(skeleton)
    llama = build_skeleton(tiny_llama_config(100), AutoModelForCausalLM)
    assert "lm_head" in quantization.unquantized_modules(llama)
    assert "model.layers.0.mlp.down_proj" in quantization.quantizable_linears(llama)


def test_the_cpu_inference_path_that_computes_in_bf16_is_off(tmp_path):
    """bitsandbytes would repack a 4-bit weight in place in eval mode on AVX512-BF16 CPUs: evaluation would not
    compute what training does, and the frozen weights' hash would change."""
    model = quantized_llama(tmp_path, "nf4").eval()
    layer = model.model.layers[0].mlp.up_proj
    before = layer.weight.data.clone()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 5)))
    assert torch.equal(layer.weight.data, before)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_importing_bitsandbytes_is_quiet_and_asks_no_hub():
    code = (
        "import sys; from finetune.core.quantization import import_bitsandbytes; import_bitsandbytes(); "
        "import peft; assert 'kernels' not in sys.modules or sys.modules['kernels'] is not None"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels-community" not in result.stderr and "Failed to load" not in result.stderr


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"model.quantization needs bitsandbytes.*\.\[quant\]"):
        quantization.import_bitsandbytes()


def fake_accelerator(device="cpu", kind=DistributedType.NO, zero_stage=None):
    plugin = SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(
        device=torch.device(device),
        distributed_type=kind,
        is_fsdp2=False,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def levers_cfg(quantization=None, optimizer="adamw", offload=False):
    return SimpleNamespace(
        model=SimpleNamespace(quantization=quantization, double_quant=True),
        train=SimpleNamespace(optimizer=optimizer, activation_offload=offload),
        lora=SimpleNamespace(enabled=True),
    )


@pytest.mark.parametrize(
    ("cfg", "accelerator", "message"),
    [
        (levers_cfg(optimizer="paged_adamw_8bit"), fake_accelerator(), "paged_adamw_8bit pages its states"),
        (levers_cfg(offload=True), fake_accelerator(), "activation_offload=true moves activations"),
        (levers_cfg("nf4"), fake_accelerator(kind=DistributedType.FSDP), "under FSDP: sharding quantized"),
        (levers_cfg("nf4"), fake_accelerator(kind=DistributedType.DEEPSPEED, zero_stage=3), "DeepSpeed ZeRO-3"),
        (levers_cfg("nf4"), fake_accelerator(kind=DistributedType.DEEPSPEED, zero_stage=2), "under DeepSpeed"),
        (levers_cfg(optimizer="adamw_8bit"), fake_accelerator(kind=DistributedType.FSDP), "adamw_8bit under FSDP"),
    ],
)
def test_levers_that_cannot_work_are_refused_before_loading(cfg, accelerator, message):
    with pytest.raises(UserError, match=message):
        check_levers(cfg, accelerator, tiny_llama_config(100), AutoModelForCausalLM)


def test_a_model_without_linear_layers_is_refused():
    gpt2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)  # Conv1D layers
    with pytest.raises(UserError, match="no torch.nn.Linear layers"):
        check_levers(levers_cfg("nf4"), fake_accelerator(), gpt2, AutoModelForCausalLM)


def test_8bit_adamw_learns_and_its_states_materialise_without_moving_a_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 1))
    optimizer = build_optimizer(model, 1e-2, 0.0, "adamw_8bit")
    assert type(optimizer).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in model.parameters()]
    materialise_optimizer_state(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8  # 8,192 elements: 8-bit states
    x, y = torch.randn(64, 128), torch.randn(64, 1)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_estimated_quantized_and_optimizer_bytes():
    # nf4 4096 x 4096: 8 MiB of weights, an absmax per 64 as uint8 (double quantization) and an fp32 per 256 of those
    assert quantized_bytes((4096, 4096), "nf4", True) == 4096 * 4096 // 2 + 262144 + 4 * 1024
    assert quantized_bytes((4096, 4096), "nf4", False) == 4096 * 4096 // 2 + 4 * 262144
    assert quantized_bytes((4096, 1024), "int8", True) == 4096 * 1024 + 4 * 4096
    big, small = torch.empty(8192), torch.empty(100)
    state, _ = optimizer_state_bytes("adamw_8bit", [("w", big), ("b", small)])
    assert state == 2 * (8192 + 4 * 32) + 2 * 4 * 100
    assert optimizer_state_bytes("adamw", [("w", big)])[0] == 2 * 4 * 8192


def test_activation_offload_leaves_cpu_tensors_and_weights_where_they_are():
    weight = torch.nn.Parameter(torch.randn(512, 512))
    assert not offloadable(weight) and not offloadable(torch.randn(1024, 1024))  # a CPU activation stays
    loss = with_activation_offload(lambda model, batch: (batch @ model).square().sum())
    x = torch.randn(4, 512)
    loss(weight, x).backward()
    assert torch.allclose(weight.grad, 2 * x.t() @ (x @ weight.detach()))


def test_under_autocast_lora_adapters_compute_in_its_dtype_without_a_copy_of_their_input():
    """peft casts each adapter's input to the adapters' fp32 (which autocast casts back to bf16: a new tensor, saved
    for backward); following autocast, the adapters save the layer's own input."""
    from finetune.core.modeling import lora_follows_autocast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(100, hidden_size=64), dtype=torch.bfloat16)
    peft_model = apply_lora(model, LoraConfig(enabled=True, dropout=0.0), "CAUSAL_LM")
    quantization.cast_trainable(peft_model, torch.float32)
    ids = torch.randint(0, 100, (2, 16))
    saved_bytes = {}
    for follows in (False, True):
        if follows:
            lora_follows_autocast(peft_model)
        storages = {}

        def pack(tensor, storages=storages):
            if not isinstance(tensor, torch.nn.Parameter):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = peft_model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        saved_bytes[follows] = sum(storages.values())
        trained = [p for p in peft_model.parameters() if p.requires_grad]
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert saved_bytes[True] < saved_bytes[False], saved_bytes


def test_an_evaluation_batch_is_bounded_by_what_a_training_micro_batch_needs():
    from finetune.training.batches import evaluation_batch_size

    messages = []
    config = tiny_llama_config(100)  # 2 layers

    def run_with(micro, eval_batch, checkpointing):
        train = SimpleNamespace(micro_batch_size=micro, gradient_checkpointing=checkpointing)
        cfg = SimpleNamespace(train=train, eval=SimpleNamespace(batch_size=eval_batch))
        accelerator = SimpleNamespace(unwrap_model=lambda model: model)
        return SimpleNamespace(cfg=cfg, accelerator=accelerator, log=SimpleNamespace(info=messages.append))

    model = SimpleNamespace(config=config)
    assert evaluation_batch_size(run_with(4, 16, False), model, 4) == 8  # 4 rows x 2 layers
    assert evaluation_batch_size(run_with(4, 16, True), model, 4) == 4  # checkpointing: the micro-batch's rows
    assert evaluation_batch_size(run_with(4, 6, False), model, 4) == 6
    assert evaluation_batch_size(run_with("auto", 64, True), model, 2) == 64  # rehearsed with the evaluation batch
    assert len(messages) == 2 and "not eval.batch_size=16" in messages[0]
