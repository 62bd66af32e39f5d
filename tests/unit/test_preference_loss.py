"""finetune/preference: per-sequence log-probs from one forward equal a plain computation (chunked head or not,
padded or padding-free, and their gradients); DPO, cDPO, IPO and RPO losses follow their formulas; the adapter-off
reference equals a separately loaded frozen base; precomputed reference log-probs equal the live ones; a damaged
cache entry is computed again."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import make_tokenizer, tiny_llama_config
from transformers import LlamaForCausalLM

from finetune.core.config import build_config
from finetune.core.schemas import DPOConfigGroup
from finetune.lm.loss import enable_chunked_loss
from finetune.preference import reference
from finetune.preference.collate import PreferenceCollator
from finetune.preference.loss import PreferenceLoss, StatsMeter, preference_losses, sequence_logps, target_counts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), tokenizer, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def pairs(n: int = 5, seed: int = 0) -> list[dict]:
    """Pairs of token ids of different lengths (ids >= 8: no special token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(8, 60, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(2, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


def manual_logps(model, examples: list[dict]) -> torch.Tensor:
    """Each pair's summed completion log-probs, each sequence run alone through the plain model: (B, 2)."""
    out = []
    for e in examples:
        row = []
        for completion in (e["chosen_ids"], e["rejected_ids"]):
            ids = torch.tensor([e["prompt_ids"] + completion])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            row.append(logp[torch.arange(len(targets)), targets][len(e["prompt_ids"]) - 1 :].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


def dpo_group(**values) -> DPOConfigGroup:
    return build_config(DPOConfigGroup, [("test", values)])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_sequence_logps_equal_each_sequence_run_alone(chunked, padding_free):
    model, examples = tiny_model(), pairs()
    expected = manual_logps(model, examples)
    if chunked:
        enable_chunked_loss(model, chunk_size=7)  # several chunks
    batch = PreferenceCollator(pad_token_id=0, padding_free=padding_free)(examples)
    with torch.no_grad():
        got = sequence_logps(model, batch)
    assert got.shape == (5, 2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    counts = target_counts(batch)
    assert counts.tolist() == [[len(e["chosen_ids"]), len(e["rejected_ids"])] for e in examples]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_loss_gradients_equal_the_plain_ones(lora):
    """The DPO loss weighs each sequence's token log-probs by its own gradient: the chunked per-row backward (weight
    gradient recomputed when the head trains; hidden-state gradients scaled when it is frozen) equals autograd's."""
    from peft import LoraConfig, get_peft_model

    plain = tiny_model()
    if lora:
        plain = get_peft_model(plain, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    chunked = copy.deepcopy(plain)
    enable_chunked_loss(chunked, chunk_size=5)
    batch = PreferenceCollator(pad_token_id=0)(pairs())
    ref = torch.randn(5, 2, dtype=torch.float64) * 3 - 20
    batch["ref_logps"] = ref.float()
    loss = PreferenceLoss(dpo_group(beta=0.5, sft_weight=0.3), reference.PrecomputedReference())
    for model in (plain, chunked):
        model.train()
        loss(model, batch).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads and (not lora or all("lora" in n for n in grads))
    for name, param in chunked.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_losses_follow_dpo_cdpo_ipo_and_rpo_formulas():
    policy = torch.tensor([[-10.0, -12.0], [-8.0, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -11.0], [-8.5, -8.0]], dtype=torch.float64)
    counts = torch.tensor([[4, 5], [2, 3]])
    h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])  # [2, -0.5]
    terms = preference_losses(policy, ref, counts, dpo_group(beta=0.1))
    torch.testing.assert_close(terms.losses, -F.logsigmoid(0.1 * h))
    smooth = preference_losses(policy, ref, counts, dpo_group(beta=0.1, label_smoothing=0.2)).losses
    torch.testing.assert_close(smooth, -0.8 * F.logsigmoid(0.1 * h) - 0.2 * F.logsigmoid(-0.1 * h))
    lengths = counts.double()
    h_avg = (policy[:, 0] - ref[:, 0]) / lengths[:, 0] - (policy[:, 1] - ref[:, 1]) / lengths[:, 1]
    ipo = preference_losses(policy, ref, counts, dpo_group(loss="ipo", beta=0.5)).losses
    torch.testing.assert_close(ipo, (h_avg - 1 / (2 * 0.5)) ** 2)
    rpo = preference_losses(policy, ref, counts, dpo_group(beta=0.1, sft_weight=2.0)).losses
    torch.testing.assert_close(rpo, -F.logsigmoid(0.1 * h) + 2.0 * (-policy[:, 0] / lengths[:, 0]))
    # rewards/chosen, rewards/rejected, rewards/margin, accuracy, logps/chosen, logps/rejected
    expected = [[0.1, -0.1, 0.2, 1.0, -10.0, -12.0], [0.05, 0.1, -0.05, 0.0, -8.0, -7.0]]
    torch.testing.assert_close(terms.stats, torch.tensor(expected, dtype=torch.float64))


def test_stats_meter_means_over_pairs_and_starts_afresh():
    meter, accelerator = StatsMeter(), SimpleNamespace(num_processes=1)
    meter.add(torch.tensor([[1.0, 0, 0, 1, 0, 0]]))
    meter.add(torch.tensor([[3.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]]))
    record = meter.pop(accelerator)
    assert record["rewards/chosen"] == pytest.approx(3.0) and record["accuracy"] == pytest.approx(1 / 3)
    assert meter.pop(accelerator) == {}


def test_adapter_off_reference_equals_a_separately_loaded_frozen_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny_model(seed=3).save_pretrained(tmp_path / "base")
    policy = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    policy = get_peft_model(policy, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    enable_chunked_loss(policy)
    batch = PreferenceCollator(pad_token_id=0)(pairs(seed=1))
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        expected = sequence_logps(base, batch)
        adapted = sequence_logps(policy, batch)
    got = reference.AdapterOffReference().logps(policy, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-2, "the adapters change nothing: the test would pass vacuously"
    assert policy.training  # its mode is restored


def test_precomputed_reference_equals_the_live_one_and_a_damaged_cache_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model(seed=5)
    enable_chunked_loss(model)
    examples = pairs(n=7, seed=2)
    ds = Dataset.from_list(examples)
    accelerator = SimpleNamespace(
        num_processes=1,
        process_index=0,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        is_main_process=True,
        wait_for_everyone=lambda: None,
    )
    run = SimpleNamespace(accelerator=accelerator, log=SimpleNamespace(info=lambda message: None))
    collate = PreferenceCollator(pad_token_id=0)
    sets = reference.precompute_reference(run, model, {"train": ds}, collate, 3, "weights", {"a": 1})
    precomputed = torch.tensor(sets["train"]["ref_logps"])
    live = reference.ModelReference(model, contextlib.nullcontext)
    batch = collate(examples[2:6])  # another batch composition, another padding
    torch.testing.assert_close(precomputed[2:6], live.logps(None, batch), rtol=0, atol=1e-5)

    (path,) = (tmp_path / "cache" / "reference").glob("*.safetensors")
    path.write_bytes(b"damaged")
    again = reference.precompute_reference(run, model, {"train": ds}, collate, 3, "weights", {"a": 1})
    assert torch.tensor(again["train"]["ref_logps"]).equal(precomputed)
    other = reference.cache_file({"train": ds}, "other weights", {"a": 1})
    assert other != path  # another reference model: another entry


def test_the_reference_resolves_per_launch_and_refuses_what_the_launch_cannot_hold():
    from accelerate.utils import DistributedType

    from finetune.core.errors import UserError
    from finetune.core.schemas import DPOConfig
    from finetune.preference.setup import reference_kind

    def cfg(**values):
        groups: dict = {}
        for key, value in values.items():
            group, name = key.split("__")
            groups.setdefault(group, {})[name] = value
        return build_config(DPOConfig, [("test", groups)])

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    zero = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    assert reference_kind(cfg(lora__enabled=True), ddp) == "adapter_off"
    assert reference_kind(cfg(lora__enabled=False), ddp) == "precomputed"
    assert reference_kind(cfg(lora__enabled=True), fsdp) == "precomputed"  # FSDP2 cannot run adapters-off steps
    assert reference_kind(cfg(lora__enabled=True), zero) == "adapter_off"
    with pytest.raises(UserError, match="dpo.reference=adapter_off under FSDP"):
        reference_kind(cfg(lora__enabled=True, dpo__reference="adapter_off"), fsdp)
    with pytest.raises(UserError, match="dpo.reference=model under"):
        reference_kind(cfg(dpo__reference="model"), zero)
