"""finetune/lm_loss.py: the chunked causal-LM loss equals the plain one (loss and every gradient), through
the model's own forward, tied and untied heads, LoRA, autocast; the converted model still saves, loads and
generates as before; packed rows (position_ids restarting at 0, no attention mask) train exactly like the
same examples padded, for eager and sdpa attention; and the probes (finetune/lm/probes.py) that run a tiny
instance of a model's class refuse packing and the chunked loss where the model would not keep either exact."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama_config
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.core.errors import UserError
from finetune.lm.loss import (
    ChunkedLossHead,
    chunked_linear_cross_entropy,
    chunked_next_token_loss,
    disable_chunked_loss,
    enable_chunked_loss,
    find_chunked_head,
    next_token_loss,
)
from finetune.lm.probes import check_packing_supported, enable_exact_chunked_loss
from finetune.training.accumulation import IGNORE_INDEX, count_next_token_terms, summed_next_token_loss

VOCAB = 301


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread. With two on a loaded 2-core machine, every op's thread barrier
    waits for a descheduled thread and this file takes 40 s instead of 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(tie: bool = False, dtype: torch.dtype = torch.float64, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, tie_word_embeddings=tie, attn_implementation=attn)).to(dtype)
    with torch.no_grad():  # larger output weights than the 0.02 init: a softmax far from uniform
        model.lm_head.weight.normal_(0, 0.3)
    return model


def lm_batch(seed: int = 1, rows: int = 3, length: int = 12) -> dict:
    """Right-padded rows with prompt tokens masked: 3 rows x 12, 20 target tokens after the shift."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, :2] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = next_token_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(actual, expected, rtol: float) -> None:
    """Loss and every gradient within rtol of the largest entry of the expected tensor."""
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = float(ref.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


# --------------------------------------------------------------------------------------------
# The chunked loss equals the plain loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_chunked_loss_and_every_gradient_equal_the_plain_ones(dtype, tie):
    """20 target tokens: chunks of 20+ (one chunk), 8 (three, the last short) and 1 (one row each)."""
    model = tiny_llama(tie, dtype)
    batch = lm_batch()
    assert int(count_next_token_terms(batch)) == 20
    expected = loss_and_grads(model, batch)
    assert torch.equal(expected[0], summed_next_token_loss(model(**batch).logits, batch["labels"]).detach())
    enable_chunked_loss(model)
    head = find_chunked_head(model)
    assert head is model.lm_head and isinstance(head, torch.nn.Linear)
    assert (head.weight is model.model.embed_tokens.weight) == tie
    for chunk_size in (None, 8, 1):
        head.chunk_size = chunk_size
        assert_same(loss_and_grads(model, batch), expected, TOLERANCE[dtype])


@pytest.mark.parametrize("recompute", [False, True], ids=["grads-in-forward", "recomputed-in-backward"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_chunked_function_with_a_bias_equals_cross_entropy(dtype, recompute):
    """The function alone, with a bias and chunks of 5 over 2 x 9 positions (13 targets)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 16, dtype=dtype, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=dtype, generator=generator, requires_grad=True)
    bias = torch.randn(VOCAB, dtype=dtype, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 10), generator=generator)
    labels[0, 3:7] = IGNORE_INDEX
    labels[1, 8] = IGNORE_INDEX

    def run(loss_fn):
        loss = loss_fn()
        grads = torch.autograd.grad(loss * 3.0, (hidden, weight, bias))  # a scaled loss, as accumulation does
        return loss.detach(), dict(zip(("hidden", "weight", "bias"), grads, strict=True))

    plain = run(lambda: summed_next_token_loss(F.linear(hidden, weight, bias), labels))
    chunked = run(lambda: chunked_next_token_loss(hidden, weight, labels, bias, chunk_size=5, recompute=recompute))
    assert_same(chunked, plain, TOLERANCE[dtype])
    with torch.no_grad():  # no gradients asked: the loss alone
        torch.testing.assert_close(
            chunked_next_token_loss(hidden, weight, labels, bias, 4), plain[0], rtol=1e-5, atol=0
        )


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op (forward or backward) returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_of_all_logits_exists_in_forward_or_backward():
    """4 x 32 positions: the logits would be 128 x 301 elements; the chunked loss's largest tensor is far
    smaller (the attention scores, 4 x 4 x 32 x 32), the plain loss's is the logits."""
    model = tiny_llama(dtype=torch.float32)
    batch = lm_batch(rows=4, length=32)
    all_logits = 4 * 32 * VOCAB
    for chunked in (False, True):
        if chunked:
            enable_chunked_loss(model, chunk_size=8)
        with LargestTensor() as largest:
            next_token_loss(model, batch).backward()
        assert (largest.numel >= all_logits) == (not chunked), largest.numel
    assert largest.numel <= 4 * 4 * 32 * 32


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    model = tiny_llama(tie=True)
    enable_chunked_loss(model)
    batch = lm_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss, grads = loss_and_grads(model, batch)
    assert float(loss) == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())


def test_under_bf16_autocast_the_chunked_loss_follows_the_plain_one():
    """CPU bf16 autocast: the projection in bf16 (as autocast's linear), the log-softmax and the loss in fp32,
    and the parameters' gradients in fp32, close to the plain path's."""
    model = tiny_llama(tie=False, dtype=torch.float32)
    batch = lm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(model, batch)
    enable_chunked_loss(model, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(loss, expected[0], rtol=1e-2, atol=0)
    for name, ref in expected[1].items():
        error = float((grads[name] - ref).norm() / ref.norm())
        assert error < 0.05, (name, error)


def test_under_fp16_autocast_gradients_are_recomputed_under_the_loss_scale():
    """fp16 flushes values below 6e-8 to zero: the plain path casts the loss-scaled gradient to fp16, so the
    chunked loss recomputes its gradients in backward where the scale is known (the default under fp16).
    Computed in forward, unscaled, far more of the small weight-gradient entries would vanish."""
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(64, 32, generator=generator) * 3).requires_grad_()
    weight = torch.randn(2000, 32, generator=generator).requires_grad_()
    targets = torch.randint(0, 2000, (64,), generator=generator)
    scale = 2.0**10  # a GradScaler's loss scale

    def weight_grad(loss_fn):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn()
        return torch.autograd.grad(loss * scale, weight)[0] / scale

    exact = weight_grad(lambda: F.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="sum"))
    small = (exact.abs() < 1e-6) & (exact != 0)

    def lost(grad):  # small entries flushed to zero
        return int((small & (grad == 0)).sum())

    plain = weight_grad(lambda: F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum"))
    chunked = partial(chunked_linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    default = weight_grad(chunked)
    in_forward = weight_grad(partial(chunked, recompute=False))
    assert lost(default) <= lost(plain) * 1.01 + 10
    assert lost(in_forward) > 2 * lost(plain)
    for grad in (plain, default, in_forward):
        assert float((grad - exact).norm() / exact.norm()) < 5e-3


def test_lora_model_gets_the_same_loss_and_adapter_gradients():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(tie=True), lora)
    for name, p in model.named_parameters():  # B starts at zero: make A's gradients non-zero as well
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = lm_batch()
    expected = loss_and_grads(model, batch)
    enable_chunked_loss(model, chunk_size=8)  # through the PeftModel
    assert isinstance(model.get_base_model().lm_head, ChunkedLossHead)
    actual = loss_and_grads(model, batch)
    assert all("lora_" in name for name in actual[1]) and len(actual[1]) == 8
    assert_same(actual, expected, TOLERANCE[torch.float64])

    targeted = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"]))
    with pytest.raises(UserError, match="not a plain"):
        enable_chunked_loss(targeted)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_saved_model_has_the_same_keys_and_loads_as_a_plain_model(tie, tmp_path):
    plain = tiny_llama(tie, torch.float32)
    model = copy.deepcopy(plain)
    enable_chunked_loss(model)
    plain.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "chunked")
    assert (
        load_file(tmp_path / "chunked" / "model.safetensors").keys()
        == load_file(tmp_path / "plain" / "model.safetensors").keys()
    )
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "chunked", attn_implementation="eager")
    assert type(loaded.lm_head) is torch.nn.Linear
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    batch = lm_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)  # no labels attached: plain logits
        assert torch.equal(loaded(**inputs).logits, plain(**inputs).logits)
    model.tie_weights()  # what from_pretrained and resize_token_embeddings call
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert isinstance(model.lm_head, ChunkedLossHead)
    disable_chunked_loss(model)
    assert type(model.lm_head) is torch.nn.Linear and find_chunked_head(model) is None


def test_generation_and_evaluation_still_see_logits():
    plain = tiny_llama(tie=True)
    model = copy.deepcopy(plain)
    enable_chunked_loss(model)
    prompt = lm_batch()["input_ids"][:1, :5]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **settings), plain.generate(prompt, **settings))
    batch = lm_batch()
    with torch.no_grad():
        torch.testing.assert_close(next_token_loss(model, batch), next_token_loss(plain, batch), rtol=1e-12, atol=0)


def test_a_forward_that_does_not_pass_every_position_is_caught():
    model = tiny_llama()
    enable_chunked_loss(model)
    batch = lm_batch()
    with pytest.raises(RuntimeError, match="did not pass every position"):
        with model.lm_head.targets(batch["labels"]):
            model(input_ids=batch["input_ids"], logits_to_keep=1)
    assert model.lm_head._targets is None  # detached again after the error


class ScaledLlama(LlamaForCausalLM):
    """Scales its logits after the output layer, as Cohere's logit_scale or Granite's logits_scaling do."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


class SoftcappedLlama(LlamaForCausalLM):
    """Soft-caps its logits after the output layer, as Gemma 2's final_logit_softcapping does."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out


def test_models_that_change_their_logits_are_refused():
    """The probe runs a tiny instance of the model's class: what its forward does to the logits decides, not its
    config keys nor how its source reads."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    for changed in (ScaledLlama, SoftcappedLlama):
        model = changed(tiny_llama().config)
        with pytest.raises(UserError, match=rf"train\.chunked_loss: {changed.__name__} does more with its logits"):
            enable_exact_chunked_loss(model)
        assert find_chunked_head(model) is None  # refused: the output layer is left as it was

    gemma = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    softcapped = Gemma2ForCausalLM(Gemma2Config(**gemma, final_logit_softcapping=30.0))
    with pytest.raises(UserError, match="final_logit_softcapping=30.0"):  # named as a hint
        enable_exact_chunked_loss(softcapped)
    enable_exact_chunked_loss(Gemma2ForCausalLM(Gemma2Config(**gemma, final_logit_softcapping=None)))

    ignored = tiny_llama()  # Llama has no soft-capping: the key changes nothing, the chunked loss is exact
    ignored.config.final_logit_softcapping = 30.0
    enable_exact_chunked_loss(ignored)
    assert isinstance(ignored.lm_head, ChunkedLossHead)

    other_head = tiny_llama()
    other_head.lm_head = torch.nn.Sequential(other_head.lm_head)
    with pytest.raises(UserError, match="not a plain"):
        enable_exact_chunked_loss(other_head)
    assert find_chunked_head(other_head) is None


class OnlyOnceLlama(LlamaForCausalLM):
    """A model class whose tiny probe instance cannot be built (stands for the exotic ones the probe cannot run)."""

    built = 0

    def __init__(self, config):
        type(self).built += 1
        if type(self).built > 1:
            raise RuntimeError("this class builds once")
        super().__init__(config)


def test_a_model_class_the_probe_cannot_run_keeps_the_plain_loss_with_a_warning():
    model = OnlyOnceLlama(tiny_llama().config)
    with pytest.warns(UserWarning, match="cannot check it.*plain loss"):
        assert enable_exact_chunked_loss(model) is False
    assert find_chunked_head(model) is None


# --------------------------------------------------------------------------------------------
# Packing: no cross-contamination between the examples of a row
# --------------------------------------------------------------------------------------------

EXAMPLE_LENGTHS = [[5, 3, 7], [4, 6]]  # two packed rows of 15 (the second ends in 5 padding tokens)


def packing_batches(seed: int = 2) -> tuple[dict, dict]:
    """The same 5 examples packed in 2 rows (position_ids restart at 0, each example's first label -100,
    no attention_mask) and unpacked, one right-padded row each (attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    examples = [torch.randint(1, VOCAB, (n,), generator=generator) for row in EXAMPLE_LENGTHS for n in row]
    width = max(sum(row) for row in EXAMPLE_LENGTHS)
    ids, positions, labels = [], [], []
    it = iter(examples)
    for row in EXAMPLE_LENGTHS:
        parts = [next(it) for _ in row]
        pad = width - sum(row)
        ids.append(torch.cat([*parts, torch.zeros(pad, dtype=torch.long)]))
        positions.append(torch.cat([*(torch.arange(len(p)) for p in parts), torch.arange(pad)]))
        labels.append(
            torch.cat([*(torch.cat([torch.tensor([IGNORE_INDEX]), p[1:]]) for p in parts), torch.full((pad,), -100)])
        )
    packed = {"input_ids": torch.stack(ids), "position_ids": torch.stack(positions), "labels": torch.stack(labels)}

    longest = max(len(e) for e in examples)
    padded_ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(padded_ids)
    for i, example in enumerate(examples):
        padded_ids[i, : len(example)] = example
        mask[i, : len(example)] = 1
    unpacked = {"input_ids": padded_ids, "attention_mask": mask, "labels": padded_ids.masked_fill(mask == 0, -100)}
    assert int(count_next_token_terms(packed)) == int(count_next_token_terms(unpacked)) == 25 - 5
    return packed, unpacked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_give_the_loss_and_gradients_of_the_padded_examples(attn, dtype):
    """sdpa agrees to fp64 rounding. Llama's eager attention takes its softmax in fp32 whatever the dtype
    (`softmax(attn_weights, dim=-1, dtype=torch.float32)` in eager_attention_forward), so in fp64 eager only
    agrees to ~1e-7; that its attention across examples is exactly zero is checked on the weights."""
    model = tiny_llama(tie=False, dtype=dtype, attn=attn)
    assert model.config.use_cache  # the default; next_token_loss turns the cache off (packing needs that)
    check_packing_supported(model)
    packed, unpacked = packing_batches()
    rtol = 1e-6 if (attn, dtype) == ("eager", torch.float64) else TOLERANCE[dtype]
    expected = loss_and_grads(model, unpacked)
    assert_same(loss_and_grads(model, packed), expected, rtol)
    enable_chunked_loss(model, chunk_size=6)
    assert_same(loss_and_grads(model, packed), expected, rtol)
    if attn == "eager":
        with torch.no_grad():
            inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
            attentions = model(**inputs, use_cache=False, output_attentions=True).attentions
        example = torch.tensor(
            [
                [i for i, n in enumerate(row + [width - sum(row)]) for _ in range(n)]
                for row, width in zip(EXAMPLE_LENGTHS, [15, 15], strict=True)
            ]
        )
        across = example[:, :, None] != example[:, None, :]  # (rows, query, key): another example's token
        for weights in attentions:  # (rows, heads, query, key), one per layer
            assert weights.shape[-1] == 15 and not weights.masked_select(across[:, None]).any()
            assert torch.all(weights.sum(-1) > 0.99)


def test_without_position_ids_the_packed_examples_see_each_other():
    """The negative control: the same packed rows with plain causal attention over each row."""
    model = tiny_llama(attn="sdpa")
    packed, unpacked = packing_batches()
    expected = float(loss_and_grads(model, unpacked)[0])
    assert float(loss_and_grads(model, packed)[0]) == pytest.approx(expected, rel=1e-10)
    no_positions = {name: value for name, value in packed.items() if name != "position_ids"}
    assert abs(float(loss_and_grads(model, no_positions)[0]) - expected) > 1e-3 * expected


def test_packing_guard():
    check_packing_supported(tiny_llama(attn="sdpa"))
    check_packing_supported(LlamaConfig(attn_implementation="flex_attention"))
    flash = LlamaConfig(attn_implementation="flash_attention_2")
    with pytest.raises(UserError, match=r"data\.packing.*model\.attn_implementation=flash_attention_2.*single row"):
        check_packing_supported(flash)
    check_packing_supported(flash, rows_per_batch=1)  # a single row: transformers splits it by position_ids
    with pytest.raises(UserError, match=r"data\.packing.*model\.attn_implementation=paged\|eager.*sdpa"):
        check_packing_supported(LlamaConfig(attn_implementation="paged|eager"))  # needs a paged cache
    bidirectional = LlamaConfig()
    bidirectional.is_causal = False
    with pytest.raises(UserError, match="attend to each other.*bidirectional"):
        check_packing_supported(bidirectional)


def test_packing_guard_refuses_architectures_that_mix_packed_examples():
    from transformers import GptOssConfig, MambaConfig, OPTConfig, Qwen3NextConfig

    for leaky in (OPTConfig(), GptOssConfig()):  # masks built from the attention mask only
        with pytest.raises(UserError, match=r"data\.packing.*attend to each other.*set data\.packing=false"):
            check_packing_supported(leaky)
    for recurrent in (Qwen3NextConfig(), MambaConfig()):  # state carried from one example into the next
        with pytest.raises(UserError, match=r"data\.packing.*attend to each other.*set data\.packing=false"):
            check_packing_supported(recurrent)


class PositionBlindLlama(LlamaForCausalLM):
    """Drops position_ids: nothing tells its packed examples apart (a model whose masks ignore them)."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_the_probe_catches_a_model_whose_packed_examples_see_each_other(attn):
    """The probe runs the model's own class: a leak in its forward is found whatever its attention."""
    model = PositionBlindLlama(tiny_llama().config)
    model.config._attn_implementation = attn
    rows = 1 if attn.startswith("flash") else None  # flash: the flattened single row, the case it supports
    with pytest.raises(UserError, match=rf"model\.attn_implementation={attn} on PositionBlindLlama: .*attend to each"):
        check_packing_supported(model, rows_per_batch=rows)
    plain = tiny_llama()
    plain.config._attn_implementation = attn
    check_packing_supported(plain, rows_per_batch=rows)


def test_probes_leave_the_callers_random_state_and_transformers_as_they_were():
    from transformers import modeling_flash_attention_utils as flash

    lazy_imports = flash._lazy_imports
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=96, attn_implementation="flash_attention_2")
    check_packing_supported(config, rows_per_batch=1)  # a config no other test probes: the probe runs
    enable_chunked_loss(tiny_llama(tie=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert flash._lazy_imports is lazy_imports and torch.get_num_threads() == threads


def test_probe_verdicts_are_kept_per_class_attention_and_shrunk_config(monkeypatch):
    """LLaMA 7B and 13B shrink to the same tiny config: one probe for both. Another attention implementation or
    the flattened row is another probe."""
    from finetune.lm import probes

    runs = []
    run_on_tiny = probes._run_on_tiny
    monkeypatch.setattr(probes, "_run_on_tiny", lambda *args: runs.append(args) or run_on_tiny(*args))
    monkeypatch.setattr(probes, "_packing_verdicts", {})
    llama_13b = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)
    check_packing_supported(LlamaConfig(attn_implementation="sdpa"))
    check_packing_supported(LlamaConfig(attn_implementation="sdpa", **llama_13b))
    assert len(runs) == 1
    check_packing_supported(LlamaConfig(attn_implementation="eager", **llama_13b))
    check_packing_supported(LlamaConfig(attn_implementation="sdpa"), rows_per_batch=1)
    assert len(runs) == 3


def test_evaluation_holds_no_full_logits_even_where_training_does():
    """train.chunked_loss=false: the evaluation's loss still goes through the chunked output layer, for its batch
    only (the same loss), and training's plain output layer is back afterwards."""
    from finetune.lm.loss import find_chunked_head
    from finetune.lm.probes import chunked_evaluation_loss

    model = tiny_llama(dtype=torch.float32).eval()
    batch = lm_batch(rows=4, length=32)
    evaluation_loss = chunked_evaluation_loss(model, next_token_loss)
    with torch.no_grad():
        plain = next_token_loss(model, batch)
        with LargestTensor() as largest:
            chunked = evaluation_loss(model, batch)
    assert largest.numel < 4 * 32 * VOCAB and torch.allclose(chunked, plain, rtol=1e-5)
    assert find_chunked_head(model) is None
