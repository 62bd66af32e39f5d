"""finetune.plan.memory_estimate against measured training steps on one CUDA GPU: a ~1B LLaMA, < 5 minutes on an H100.

    python benchmarks/gpu_memory_estimate.py         # on the GPU machine: a markdown table on stdout
    python benchmarks/gpu_memory_estimate.py --cpu   # anywhere: the same cases with a tiny LLaMA on CPU (~2 minutes)

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, 128,256-token vocabulary,
tied embeddings: 1.24B parameters), built from its config with random weights on the device. Each case prepares it
with an Accelerator in bf16 mixed precision, as the recipes are launched, with fp32 or pure bf16 weights, full
fine-tuning or LoRA (r 16, all linear layers), gradient checkpointing on or off, the chunked loss on or off, at two
sequence lengths (micro-batch 4; one position padded, as the recipes' batches are, every other one a target). It
runs 2 training steps as finetune.training does: finetune.lm.loss.next_token_loss, accelerator.backward, clipping at
1.0, the fused AdamW step, zero_grad.

Measured: torch.cuda.max_memory_allocated over the case, less what was allocated before the model was built (what
the recipes report on a GPU). With --cpu: the growth of the process's peak resident set size (VmHWM, reset per case
through /proc/self/clear_refs; large blocks mmap'ed so that freed memory leaves the process). Estimated:
finetune.plan.memory_estimate.estimate_memory with the same settings. Needs only torch, transformers, peft, accelerate.
A case that fails is a FAIL row and the script exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from finetune.core.modeling import apply_lora  # noqa: E402
from finetune.core.optim import build_optimizer  # noqa: E402
from finetune.core.precision import WEIGHT_DTYPES  # noqa: E402
from finetune.core.schemas import LoraConfig  # noqa: E402
from finetune.lm.loss import enable_chunked_loss, next_token_loss  # noqa: E402
from finetune.plan.memory_estimate import estimate_memory  # noqa: E402

GPU = {
    "model": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "batch": 4, "seq": (512, 2048),
}  # fmt: skip
CPU = {
    "model": {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True},
    "batch": 2, "seq": (64, 256),
}  # fmt: skip
LORA = LoraConfig(enabled=True, r=16, alpha=32, dropout=0.05)
# (weights dtype, lora, gradient checkpointing, chunked loss, sequence length index)
CASES = [
    ("fp32", False, False, False, 0),
    ("fp32", False, False, True, 0),
    ("fp32", False, False, False, 1),
    ("fp32", False, False, True, 1),
    ("fp32", False, True, False, 1),
    ("fp32", False, True, True, 1),
    ("fp32", True, False, False, 0),
    ("fp32", True, False, True, 1),
    ("fp32", True, True, False, 1),
    ("fp32", True, True, True, 1),
    ("bf16", False, False, False, 1),
    ("bf16", False, True, True, 1),
    ("bf16", True, False, True, 1),
    ("bf16", True, True, False, 0),
]


class HostMemory:
    """Peak resident memory per case on CPU: VmHWM reset through /proc/self/clear_refs (Linux >= 4.0)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD, fixed: large blocks mmap'ed, and unmapped when freed
        self.trim = libc.malloc_trim

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> int:
        self.trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


class DeviceMemory:
    def start(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()


def run_case(accelerator, memory, config, case, batch: int, seq: int) -> int:
    """Peak bytes of building the model and 2 training steps, over what was allocated before."""
    weights_dtype, lora, checkpointing, chunked, _ = case
    before = memory.start()
    torch.manual_seed(0)
    with accelerator.device:
        model = AutoModelForCausalLM.from_config(config, dtype=WEIGHT_DTYPES[weights_dtype])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = apply_lora(model, LORA, task_type="CAUSAL_LM")
    if chunked:
        enable_chunked_loss(model)
    optimizer = build_optimizer(model, 1e-5, 0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=accelerator.device)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # one padded position, as the recipes' batches have: transformers builds the attention mask
    batch_ = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    for _ in range(2):
        loss = next_token_loss(model, batch_)
        accelerator.backward(loss / ids[:, 1:].numel())
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        del loss
    peak = memory.peak() - before
    accelerator.free_memory(model, optimizer)
    del model, optimizer
    gc.collect()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="a tiny LLaMA on CPU, peak RSS measured")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run it on a GPU machine, or with --cpu")
    setup = CPU if args.cpu else GPU
    memory = HostMemory() if args.cpu else DeviceMemory()
    if args.cpu:
        torch.set_num_threads(1)  # each case's RSS without other threads' scratch memory
    accelerator = Accelerator(mixed_precision="bf16", cpu=args.cpu)
    config = LlamaConfig(**setup["model"])
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; LLaMA {setup['model']}; micro-batch {setup['batch']}, bf16 autocast")
    # Warm-up, every path once: one-time allocations (cuBLAS workspace, lazily imported modules) are not a case's.
    for lora in (False, True):
        run_case(accelerator, memory, config, ("fp32", lora, True, True, 0), 1, 16)
    rows, failed, start = [], False, time.perf_counter()
    for case in CASES:
        weights_dtype, lora, checkpointing, chunked, seq_index = case
        seq = setup["seq"][seq_index]
        name = (
            f"{weights_dtype} weights, {'LoRA' if lora else 'full'}, seq {seq}"
            f"{', checkpointing' if checkpointing else ''}{', chunked loss' if chunked else ''}"
        )
        try:
            estimate = estimate_memory(
                config,
                AutoModelForCausalLM,
                micro_batch_size=setup["batch"],
                seq_len=seq,
                weights_dtype=weights_dtype,
                mixed_precision="bf16",
                lora=LORA if lora else None,
                gradient_checkpointing=checkpointing,
                chunked_loss=chunked,
                device_type="cpu" if args.cpu else "cuda",
            ).peak
            measured = run_case(accelerator, memory, config, case, setup["batch"], seq)
            error = 100 * (estimate - measured) / measured
            rows.append(f"| {name} | {estimate / 2**20:,.0f} | {measured / 2**20:,.0f} | {error:+.1f} |")
        except Exception as err:  # noqa: BLE001  (a FAIL row, and the other cases still run)
            failed = True
            rows.append(f"| {name} | FAIL | {type(err).__name__}: {str(err)[:80]} | |")
            gc.collect()
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n| case | estimate MiB | measured MiB | error % |\n| --- | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\n{len(CASES)} cases in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
