"""Memory levers, one added per row (as torchtune's memory table): measured against TRL on CPU, estimated for real
models, measured on a GPU.

    # once: TRL in a venv of its own (the project's .venv stays as it is; .venv* is git-ignored)
    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 \
        && .venv-bench/bin/pip install -e . trl "bitsandbytes>=0.50"
    .venv-bench/bin/python benchmarks/memory_levers.py             # CPU vs TRL, 12-25 minutes: results/memory_levers.*
    .venv-bench/bin/python benchmarks/memory_levers.py --quick     # smoke run, a tiny model (~2 minutes, tmp dir)
    python benchmarks/memory_levers.py --estimate                  # real models, estimated: no weights, 2-4 minutes
    .venv-bench/bin/python benchmarks/memory_levers.py --prepare   # here: wheels the GPU image lacks -> .gpu_carry/
    python benchmarks/memory_levers.py --gpu                       # on one CUDA GPU, < 10 minutes on an H100

The rows, each with the levers of the rows above it: full fine-tuning; LoRA (r 8, alpha 16, dropout 0.05, every
linear layer: `lora.enabled=true`); QLoRA (the base's linear layers in 4-bit nf4 with double quantization,
`model.quantization=nf4`); 8-bit AdamW (`train.optimizer=adamw_8bit`); gradient checkpointing
(`train.gradient_checkpointing=true`); the chunked loss (`train.chunked_loss=true`, the recipe's default: the rows
above set it false); and on a GPU activation offload (`train.activation_offload=true`, refused on CPU, where
activations are in host memory already).

CPU (default): a LLaMA with Llama-3.2-1B's shapes (hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocabulary
128,256, tied embeddings, rope theta 500,000) but 4 layers (--layers), ~0.5B parameters, random weights written
once as an fp32 safetensors checkpoint that both trainers load. Chats of exactly 512 tokens (the demo's character
tokenizer: one token a character; the model's vocabulary beyond its ~100 ids is never an input, but every logit is
computed), loss on the assistant's tokens only, micro-batch 1 (--micro-batch), 4 optimizer steps (--steps; one
epoch), fp32, constant lr, one process. Ours: recipes/sft.py through `accelerate launch`; TRL: trl.SFTTrainer
(assistant_only_loss, peft LoRA with the same r/alpha/dropout on all linear layers, BitsAndBytesConfig nf4 + double
quantization computing in fp32, optim=adamw_bnb_8bit, gradient_checkpointing with use_reentrant=False) as a worker
of this script; each run a fresh process, ours then TRL's for each row. TRL 1.x computes every training loss
through its own chunked LM head (no switch), so all its rows have a chunked loss; its '+ chunked loss' row repeats
the row above.

Measured the same way in both, by the same hooks: RSS just before the model loads (the process baseline: Python,
torch, the trainer's imports, the data); the peak resident set size up to the start of training (loading and
preparing the model: VmHWM, which is then reset through /proc/self/clear_refs) and during training (VmHWM at its
end); the process's peak (what ru_maxrss reports) is the larger of the two. tokens/s: the tokens of every training
micro-batch (a forward pre-hook on the decoder, see benchmarks/sft_vs_trl.py's ForwardMeter) over the trainer's
training time; steady: steps after the first. The estimate is finetune.plan.memory_estimate.estimate_memory with
device_type="cpu": the growth of the RSS in training over the baseline, so it is set beside (training peak - RSS
before the model loads).

--estimate: estimate_memory for Llama-3.2-1B, Llama-3.1-8B and Qwen2.5-7B (their Hub config.json files are in
benchmarks/model_configs/), every row, bf16 mixed precision on CUDA, at torchtune's setting (batch 2, packed to
2,048 tokens) and at batch 1 x 4,096; the full and LoRA rows hold their weights in bf16 (pure bf16, as torchtune's
full recipe; LoRA adapters stay fp32), the QLoRA rows fp32 adapters on the 4-bit base. Which cards it fits: the
estimate (torch.cuda.max_memory_allocated) plus 0.5 GiB for the CUDA context within the card's memory.

--gpu: the rows on a random-weight Llama-3.2-1B-shaped model (16 layers), bf16 mixed precision, the weights as in
--estimate, batch 2 x 2,048 tokens; measured: the recipe's eval_results.json memory_mb.peak
(torch.cuda.max_memory_allocated), beside the estimate; TRL's rows too where trl imports and time is left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import runpy
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_vs_trl as bench  # noqa: E402  (benchmarks/ is not a package)

REPO = bench.REPO
MODEL_CONFIGS = REPO / "benchmarks" / "model_configs"
# What --gpu needs beyond torch, transformers and accelerate (`--prepare` downloads what the GPU image lacks).
GPU_NEEDS = ["bitsandbytes", "datasets", "peft", "psutil"]

# The levers, cumulative: each row adds one to the settings of the row above.
NO_LEVERS = {"lora": False, "quantization": None, "optimizer": "adamw", "gradient_checkpointing": False,
             "chunked_loss": False, "activation_offload": False}  # fmt: skip
LEVERS = [
    ("full", {}),
    ("LoRA", {"lora": True}),
    ("QLoRA nf4", {"quantization": "nf4"}),
    ("+ 8-bit AdamW", {"optimizer": "adamw_8bit"}),
    ("+ gradient checkpointing", {"gradient_checkpointing": True}),
    ("+ chunked loss", {"chunked_loss": True}),
    ("+ activation offload", {"activation_offload": True}),  # CUDA only
]
LLAMA_1B = {"vocab": 128256, "hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8}
SETUPS = {  # model sizes, sequence length, micro-batch, optimizer steps, warm-up steps left out of `steady`
    "cpu": {"model": {**LLAMA_1B, "layers": 4}, "seq": 512, "micro": 1, "steps": 4, "excluded": 1,
            "timeout": 1800},
    "quick": {"model": {"vocab": 32000, "hidden": 256, "intermediate": 1024, "layers": 2, "heads": 4,
                        "kv_heads": 2}, "seq": 128, "micro": 1, "steps": 2, "excluded": 0, "timeout": 300},
    "gpu": {"model": LLAMA_1B, "seq": 2048, "micro": 2, "steps": 6, "excluded": 2, "timeout": 150,
            "budget": 480},
}  # fmt: skip
LR, SEED = 1e-4, 42
# TRL's run, as the recipe's: one epoch, constant lr, no weight decay, clipping at 1, loss on the assistant's tokens;
# no checkpoints, evaluation, trackers or progress bar; data in the main process.
TRL_RUN = {"num_train_epochs": 1, "learning_rate": LR, "lr_scheduler_type": "constant", "weight_decay": 0.0,
           "max_grad_norm": 1.0, "assistant_only_loss": True, "save_strategy": "no", "eval_strategy": "no",
           "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0}  # fmt: skip
ESTIMATED_MODELS = {"Llama-3.2-1B": "llama-3.2-1b", "Llama-3.1-8B": "llama-3.1-8b", "Qwen2.5-7B": "qwen2.5-7b"}
ESTIMATED_SHAPES = {"batch 2 x 2,048 (packed)": (2, 2048), "batch 1 x 4,096": (1, 4096)}
CUDA_CONTEXT_GIB = 0.5
# Usable GiB of each card size: nvidia-smi's total (an 80 GB A100/H100 shows 81,559-81,920 MiB).
CARDS = {"8 GB": 8.0, "12 GB": 12.0, "16 GB": 16.0, "24 GB": 24.0, "80 GB": 79.6}
# torchtune's README ("Memory and training speed"): Llama-3.1-8B, batch 2, packed 2,048 tokens, torch.compile, one
# RTX 4090, with its llama3_1/8B_*_single_device configs: activation checkpointing and a chunked cross-entropy in all;
# LoRA r 8, alpha 16, dropout 0 on the q, v and output projections and the MLP; the full recipe with PagedAdamW8bit
# stepped inside backward (optimizer_in_bwd). Beside each: our estimate with the same levers where we have them.
TORCHTUNE_LORA = {"r": 8, "alpha": 16, "dropout": 0.0,
                  "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
TORCHTUNE_8B = [
    ("full", 18.9, {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True, "chunked_loss": True}),
    ("LoRA", 16.2, {"lora": TORCHTUNE_LORA, "gradient_checkpointing": True, "chunked_loss": True}),
    ("QLoRA", 7.4, {"lora": TORCHTUNE_LORA, "quantization": "nf4", "gradient_checkpointing": True,
                    "chunked_loss": True}),
]  # fmt: skip


def lever_rows(device: str) -> list[tuple[str, dict]]:
    """(name, levers) of every cumulative row that runs on `device` (activation offload: CUDA only)."""
    rows, levers = [], dict(NO_LEVERS)
    for name, added in LEVERS:
        levers = {**levers, **added}
        if device == "cuda" or not levers["activation_offload"]:
            rows.append((name, levers))
    return rows


def weights_dtype(levers: dict, mixed_precision: str) -> str:
    """train.weights_dtype of a row: under bf16 mixed precision the full and LoRA rows hold pure bf16 weights
    (torchtune's full recipe; LoRA adapters stay fp32), the QLoRA rows fp32 adapters on the quantized base."""
    return "bf16" if mixed_precision == "bf16" and levers["quantization"] is None else "fp32"


def estimate(model_config, levers: dict, micro: int, seq: int, device: str, mixed: str, loss_tokens=None):
    """estimate_memory for one row; `levers["lora"]`: True (the recipe's LoRA defaults) or LoraConfig's fields."""
    from transformers import AutoModelForCausalLM

    from finetune.core.schemas import LoraConfig
    from finetune.plan.memory_estimate import estimate_memory

    return estimate_memory(
        model_config,
        AutoModelForCausalLM,
        micro_batch_size=micro,
        seq_len=seq,
        loss_tokens=loss_tokens,
        weights_dtype=weights_dtype(levers, mixed),
        mixed_precision=mixed,
        optimizer=levers["optimizer"],
        lora=LoraConfig(enabled=True, **(levers["lora"] if isinstance(levers["lora"], dict) else {}))
        if levers["lora"]
        else None,
        gradient_checkpointing=levers["gradient_checkpointing"],
        chunked_loss=levers["chunked_loss"],
        device_type=device,
        quantization=levers["quantization"],
        double_quant=True,
        activation_offload=levers["activation_offload"],
    )


def lora_settings() -> dict:
    """The recipe's LoRA defaults (r, alpha, dropout): what both trainers use."""
    from finetune.core.schemas import LoraConfig

    lora = LoraConfig()
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout}


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


def fixed_length_chats(tokenizer, n: int, seq_len: int, seed: int) -> list[dict]:
    """`n` chats of exactly `seq_len` tokens: "reverse: <letters>" and its answer, every batch the same shape (no
    padding) in both trainers; about half the tokens are the assistant's (the targets)."""
    rng = random.Random(seed)
    overhead = len(chat_ids(tokenizer, "reverse: ", ""))
    letters, odd = divmod(seq_len - overhead, 2)
    rows = []
    for _ in range(n):
        word = "".join(rng.choices(string.ascii_lowercase, k=letters))
        rows.append({"messages": [{"role": "user", "content": f"reverse: {word}" + " " * odd},
                                  {"role": "assistant", "content": word[::-1]}]})  # fmt: skip
        user, answer = (m["content"] for m in rows[-1]["messages"])
        if len(chat_ids(tokenizer, user, answer)) != seq_len:
            raise RuntimeError(f"a chat of {len(chat_ids(tokenizer, user, answer))} tokens, not {seq_len}")
    return rows


def chat_ids(tokenizer, user: str, answer: str) -> list[int]:
    chat = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]


def make_model(path: Path, sizes: dict, max_positions: int, device: str) -> None:
    """A LLaMA of `sizes` with random weights (seed SEED) and the demo's chat tokenizer, saved as an fp32 safetensors
    checkpoint that every run loads (in a subprocess: the driver holds neither the weights nor a CUDA context)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    bench.write_model_dir(path, sizes, max_positions=max_positions)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Measuring inside the training process (both trainers)
# ---------------------------------------------------------------------------------------------


class MemoryMarks:
    """Memory (MiB) at the same points in both trainers: before the model loads; when training starts, the peak so
    far (loading and preparing the model); when it ends, the peak in training. On CPU: VmRSS and VmHWM, the latter
    reset when training starts. On CUDA: memory_allocated and max_memory_allocated since the process started (what
    the recipe reports as memory_mb.peak), not reset."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks: dict[str, float] = {}

    def before_load(self) -> None:
        self.marks["before_load_mb"] = self._current()

    def training_starts(self) -> None:
        self.marks["load_peak_mb"] = self._peak()
        if not self.cuda:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def training_ends(self) -> None:
        self.marks["train_peak_mb"] = self._peak()
        if not self.cuda:  # file pages count in RSS: a checkpoint's, mmap'ed by safetensors, while a tensor uses it
            self.marks["end_file_mb"] = _proc_status("RssFile")

    def _current(self) -> float:
        import torch

        return torch.cuda.memory_allocated() / 2**20 if self.cuda else _proc_status("VmRSS")

    def _peak(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _proc_status("VmHWM")


def _proc_status(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def weights_checksum(model, chunk: int = 1 << 20) -> float:
    """Sum of every weight's elements (4-bit layers: their packed bytes), a megabyte at a time: ForwardMeter's
    checksum sums each tensor cast to float64 at once, a copy twice the size of the largest (2 GiB for a 128k x 2048
    embedding), which would set the peak of the runs it measures."""
    import torch

    total = 0.0
    with torch.no_grad():
        for param in model.parameters():
            flat = param.data.reshape(-1)
            total += sum(float(flat[i : i + chunk].sum(dtype=torch.float64)) for i in range(0, flat.numel(), chunk))
    return total


def recipe_worker(stats: Path, device: str, recipe_args: list[str]) -> None:
    """recipes/sft.py in this process (under `accelerate launch`), with a ForwardMeter on its model and the
    MemoryMarks taken where the recipe reads its own memory (finetune.training.loop's memory_mb at the start and the
    end of training)."""
    import finetune.core.modeling
    import finetune.training.loop

    marks, record = MemoryMarks(device), {}
    original_load, original_memory = finetune.core.modeling.load_causal_lm, finetune.training.loop.memory_mb
    meter: bench.ForwardMeter | None = None

    def load_causal_lm(cfg, tokenizer, *args, **kwargs):
        nonlocal meter
        marks.before_load()
        model = original_load(cfg, tokenizer, *args, **kwargs)
        meter = bench.ForwardMeter(tokenizer.pad_token_id, 1)
        meter.attach(model)
        record["init_checksum"] = weights_checksum(model)
        return model

    def memory_mb(accelerator_device):
        marks.training_ends() if "load_peak_mb" in marks.marks else marks.training_starts()
        return original_memory(accelerator_device)

    finetune.core.modeling.load_causal_lm, finetune.training.loop.memory_mb = load_causal_lm, memory_mb
    sys.argv = [str(bench.RECIPE), *recipe_args]
    try:
        runpy.run_path(str(bench.RECIPE), run_name="__main__")
    finally:
        record["marks"] = marks.marks
        if meter is not None:
            record["meter"] = {"tokens": [int(t) for t in meter.tokens], "padded": meter.padded,
                               "stamps": meter.stamps, "cpu_stamps": meter.cpu_stamps}  # fmt: skip
        stats.write_text(json.dumps(record))


def trl_worker(spec: dict) -> dict:
    """One SFTTrainer run (one epoch) with `spec`'s levers; returns what the driver compares."""
    import torch
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.core.precision import WEIGHT_DTYPES
    from finetune.core.quantization import compute_dtype, import_bitsandbytes
    from finetune.training.accumulation import IGNORE_INDEX

    device, mixed = spec["device"], spec["mixed_precision"]
    if device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the recipe does with one process
    if spec["quantization"] or spec["optimizer"] == "adamw_8bit":
        import_bitsandbytes()  # as the recipe imports it: without the Hub lookup of a CPU kernel
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks = MemoryMarks(device)
    marks.before_load()
    if spec["quantization"]:
        dtype = compute_dtype(mixed, spec["weights_dtype"])
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quantization"],
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)  # fmt: skip
        loading = {"quantization_config": quantized, "device_map": {"": torch.device(device)}}
    else:
        dtype, loading = WEIGHT_DTYPES[spec["weights_dtype"]], {}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, **loading)
    meter = bench.ForwardMeter(tokenizer.pad_token_id, 1)
    meter.attach(model)
    init_checksum = weights_checksum(model)

    class Clock(TrainerCallback):
        """Training time and the memory marks: on_train_begin (model and optimizer prepared) to on_train_end."""

        def on_train_begin(self, args, state, control, **kwargs):
            marks.training_starts()
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            marks.training_ends()

    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        lora = spec["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    checkpointing = spec["gradient_checkpointing"]
    levers = {  # TRL's default gradient_checkpointing is True
        "optim": "adamw_bnb_8bit" if spec["optimizer"] == "adamw_8bit" else "adamw_torch_fused",
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "activation_offloading": spec["activation_offload"],
        "bf16": mixed == "bf16",
    }
    args = SFTConfig(output_dir=spec["out"], use_cpu=device == "cpu", seed=spec["seed"], **levers, **TRL_RUN,
                     per_device_train_batch_size=spec["micro"], max_length=spec["max_length"])  # fmt: skip
    train = load_dataset("json", data_files=spec["train"], split="train")
    clock = Clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    prepared = trainer.train_dataset
    trainer.train()
    return {
        **meter.summary(trainer.state.global_step, spec["excluded"], clock.seconds),
        "steps": trainer.state.global_step,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "init_checksum": init_checksum,
        **marks.marks,
        "data_tokens": sum(len(x) for x in prepared["input_ids"]),
        "data_targets": sum(sum(1 for t in y[1:] if t != IGNORE_INDEX) for y in prepared["labels"]),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def lever_args(spec: dict) -> list[str]:
    """The recipe's keys for `spec`'s levers (bench.recipe_args has the rest, LoRA included)."""
    keys = {
        "model.quantization": spec["quantization"] or "null",
        "train.optimizer": spec["optimizer"],
        "train.gradient_checkpointing": spec["gradient_checkpointing"],
        "train.activation_offload": spec["activation_offload"],
        "train.weights_dtype": spec["weights_dtype"],
    }
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in keys.items()]


def run_recipe(spec: dict) -> dict:
    """recipes/sft.py under `accelerate launch`, with this script's meter and marks around it (`recipe_worker`)."""
    out = Path(spec["out"])
    stats = out.parent / f"{out.name}.stats.json"
    cmd = [*bench.launch_command(spec["mixed_precision"]), __file__, "--recipe-worker", str(stats), spec["device"],
           "--", *bench.recipe_args(spec), *lever_args(spec)]  # fmt: skip
    start = time.perf_counter()
    bench._run(cmd, spec)
    results = json.loads((out / "eval_results.json").read_text())
    record = json.loads(stats.read_text())
    meter = bench.ForwardMeter(0, 1)
    meter.tokens, meter.padded, meter.stamps, meter.cpu_stamps = (
        record["meter"][k] for k in ("tokens", "padded", "stamps", "cpu_stamps")
    )
    targets = re.search(r"([\d,]+) tokens, ([\d,]+) of them targets", results["train_data"])
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    shutil.rmtree(out, ignore_errors=True)  # final/ holds the whole model
    return {
        **meter.summary(results["step"], spec["excluded"], results["train_runtime_s"]),
        "steps": results["step"],
        "losses": [loss for loss in losses if loss is not None],
        "init_checksum": record["init_checksum"],
        **record["marks"],
        "recipe_memory_mb": results["memory_mb"],  # its own report (on CPU its peak after the VmHWM reset)
        "data_tokens": int(targets.group(1).replace(",", "")),
        "data_targets": int(targets.group(2).replace(",", "")),
        "wall_s": time.perf_counter() - start,
    }


def run_trl(spec: dict) -> dict:
    start = time.perf_counter()
    result = bench._run([sys.executable, __file__, "--trl-worker", json.dumps(spec)], spec)
    shutil.rmtree(spec["out"], ignore_errors=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def check_pair(ours: dict, trl: dict) -> list[str]:
    """What does not match between the two trainers' runs of one row (empty: all fine)."""
    problems = []
    if ours["init_checksum"] != trl["init_checksum"]:
        problems.append(f"initial weights differ ({ours['init_checksum']} vs {trl['init_checksum']})")
    if not ours["tokens"] == trl["tokens"] == ours["data_tokens"] == trl["data_tokens"]:
        problems.append(f"tokens differ: ours {ours['tokens']} (data {ours['data_tokens']}), TRL {trl['tokens']} "
                        f"(data {trl['data_tokens']})")  # fmt: skip
    if ours["data_targets"] != trl["data_targets"]:
        problems.append(f"assistant targets differ: ours {ours['data_targets']}, TRL {trl['data_targets']}")
    return problems


def measure(setup: dict, device: str, with_trl: bool) -> dict:
    """Every row on `device`, ours then TRL's, each in a fresh process; the estimate beside each."""
    from importlib.metadata import version

    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    mixed = "bf16" if device == "cuda" else "no"
    rows_to_run = lever_rows(device)
    work = Path(tempfile.mkdtemp(prefix="memory_levers_"))
    try:
        model_dir = work / "model"
        made = subprocess.run([sys.executable, __file__, "--make-model", str(model_dir), device,
                               json.dumps(setup["model"]), str(setup["seq"])], cwd=REPO, capture_output=True,
                              text=True)  # fmt: skip
        if made.returncode:
            raise SystemExit(f"could not build the model:\n{(made.stdout + made.stderr)[-3000:]}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        chats = fixed_length_chats(tokenizer, setup["steps"] * setup["micro"] + 2, setup["seq"], SEED)
        train = bench.write_jsonl(work / "train.jsonl", chats[2:])
        validation = bench.write_jsonl(work / "validation.jsonl", chats[:2])
        targets = len(chats[0]["messages"][1]["content"]) + 1  # the answer and its end-of-turn token
        model_config = AutoConfig.from_pretrained(model_dir)
        estimates = {  # before any run: a failing estimate should not cost a whole measurement
            name: estimate(model_config, levers, setup["micro"], setup["seq"], device, mixed, setup["micro"] * targets)
            for name, levers in rows_to_run
        }
        print(f"model and data ready in {time.perf_counter() - start:.0f} s ({work})", flush=True)
        common = {
            "model": str(model_dir), "random_init": False, "train": str(train), "validation": str(validation),
            "max_length": setup["seq"], "packing": False, "grouped": False, "micro": setup["micro"], "accumulation": 1,
            "lr": LR, "scheduler": "constant", "warmup": 0, "seed": SEED, "eval_batch_size": 2,
            "excluded": setup["excluded"], "device": device, "mixed_precision": mixed,
        }  # fmt: skip
        rows = [
            {"name": name, "levers": levers, "weights_dtype": weights_dtype(levers, mixed),
             "estimate": vars(estimates[name]) | {"peak": estimates[name].peak}}
            for name, levers in rows_to_run
        ]  # fmt: skip
        trainers = ["ours", "trl"] if with_trl else ["ours"]
        # On a CPU shared with other work, the pair of a row back to back; against a time budget, ours first.
        order = [(t, row) for t in trainers for row in rows] if "budget" in setup else [
            (t, row) for row in rows for t in trainers]  # fmt: skip
        for trainer, row in order:
            name, left = row["name"], setup.get("budget", float("inf")) - (time.perf_counter() - start)
            if left < 40:
                row[trainer] = {"error": "not run: the time budget is spent"}
                continue
            spec = {**common, **row["levers"], "name": f"{name} ({trainer})", "weights_dtype": row["weights_dtype"],
                    "lora": lora_settings() if row["levers"]["lora"] else None, "timeout": min(setup["timeout"], left),
                    "out": str(work / re.sub(r"\W+", "_", f"{trainer} {name}"))}  # fmt: skip
            try:
                row[trainer] = (run_recipe if trainer == "ours" else run_trl)(spec)
            except bench.RunFailed as err:
                row[trainer] = {"error": str(err)}
            print(progress_line(name, trainer, row[trainer]), flush=True)
        problems = [
            f"{row['name']}: {problem}"
            for row in rows
            if "steps" in row.get("ours", {}) and "steps" in row.get("trl", {})
            for problem in check_pair(row["ours"], row["trl"])
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total, head = bench.parameter_count(setup["model"])
    packages = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", *(["trl"] if with_trl else [])]
    versions = ", ".join(f"{name} {version(name)}" for name in packages)
    return {
        "settings": {
            **{k: v for k, v in setup.items() if k not in ("timeout", "budget")},
            "parameters": total,
            "output_layer_parameters": head,
            "targets_per_chat": targets,
            "lora": lora_settings(),
            "lr": LR,
            "device": machine(device),
            "mixed_precision": mixed,
            "versions": versions,
            "date": time.strftime("%Y-%m-%d"),
            "total_s": round(time.perf_counter() - start),
        },
        "rows": rows,
        "problems": problems,
    }


def progress_line(name: str, trainer: str, r: dict) -> str:
    if "error" in r:
        return f"{name} ({trainer}): FAIL\n{r['error']}"
    return (f"{name} ({trainer}): peak {peak_mb(r) / 1024:.2f} GiB (before load {r['before_load_mb'] / 1024:.2f}, "
            f"load {r['load_peak_mb'] / 1024:.2f}, training {r['train_peak_mb'] / 1024:.2f}), "
            f"{r['tokens_per_s']:.0f} tokens/s ({r['steady_tokens_per_s']:.0f} steady), {r['steps']} steps, "
            f"last loss {r['losses'][-1]:.4f}, wall {r['wall_s']:.0f} s")  # fmt: skip


def peak_mb(r: dict) -> float:
    """The process's peak up to the end of training (what ru_maxrss, or max_memory_allocated, reports then)."""
    return max(r["load_peak_mb"], r["train_peak_mb"])


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{len(os.sched_getaffinity(0))} cores of {names[0] if names else 'an unknown CPU'}"


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _field(r: dict, fn) -> float | None:
    return None if "error" in r else fn(r)


def measured_report(results: dict) -> str:
    s = results["settings"]
    m = s["model"]
    cuda = s["mixed_precision"] == "bf16"
    lines = [
        f"{s['device']}; {s['versions']}; {s['date']}. LLaMA {m['layers']} layers x {m['hidden']} hidden, MLP "
        f"{m['intermediate']}, {m['heads']}/{m['kv_heads']} heads, vocabulary {m['vocab']:,}, tied embeddings "
        f"({s['parameters'] / 1e6:,.0f}M parameters, {s['output_layer_parameters'] / 1e6:,.0f}M of them the "
        f"embedding), random weights from one fp32 checkpoint; chats of exactly {s['seq']} tokens "
        f"({s['targets_per_chat']} targets), micro-batch {s['micro']}, {s['steps']} optimizer steps, "
        f"{'bf16 mixed precision' if cuda else 'fp32'}, LoRA r {s['lora']['r']} alpha {s['lora']['alpha']}; "
        f"{s['total_s']} s in all. Each row adds one lever to the row above.",
        "",
    ]
    unit = "CUDA allocated" if cuda else "RSS"
    lines += [
        f"| row | ours peak {unit} GiB | TRL peak {unit} GiB | ours / TRL | ours tokens/s | TRL tokens/s | "
        "ours / TRL | ours / TRL per CPU-s | estimate GiB | ours measured GiB (same basis) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        ours, trl = row.get("ours", {"error": "-"}), row.get("trl", {"error": "not run"})
        peaks = [_field(r, peak_mb) for r in (ours, trl)]
        rates = [_field(r, lambda x: x["steady_tokens_per_s"]) for r in (ours, trl)]
        cpu_rates = [None if cuda else _field(r, lambda x: x["steady_tokens_per_cpu_s"]) for r in (ours, trl)]
        same_basis = _field(ours, lambda x: x["train_peak_mb"] - (0 if cuda else x["before_load_mb"]))
        lines.append(
            f"| {row['name']} | {_gib(peaks[0])} | {_gib(peaks[1])} | {_ratio(*peaks)} | "
            f"{'-' if rates[0] is None else f'{rates[0]:.0f}'} | {'-' if rates[1] is None else f'{rates[1]:.0f}'} | "
            f"{_ratio(*rates)} | {_ratio(*cpu_rates)} | {row['estimate']['peak'] / 2**30:.2f} | {_gib(same_basis)} |"
        )
    basis = (
        "max_memory_allocated at the end of training (the recipe's memory_mb.peak)"
        if cuda
        else "the peak RSS in training less the RSS just before the model loaded"
    )
    lines += [
        "",
        f"Peak: the process's peak up to the end of training (model loading included). tokens/s: steady, from the "
        f"start of step {s['excluded'] + 1} to the start of the last; per CPU-s: the same tokens over the process's "
        "CPU time (all threads), less sensitive than wall time to other work on the machine. The estimate "
        f"(estimate_memory, device_type={'cuda' if cuda else 'cpu'}) is set beside {basis}.",
        "",
        "Where each run's memory went (MiB) and its throughput:",
        "",
        "| row | trainer | weights | before load | peak while loading | peak in training | training - before load "
        "| file-backed at the end | tokens/s (whole) | tokens/s (steady) | tokens/CPU-s | last loss | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        for trainer in ("ours", "trl"):
            r = row.get(trainer)
            if r is None:
                continue
            if "error" in r:
                lines.append(
                    f"| {row['name']} | {trainer} | | | | | | | | | | FAIL: {r['error'].splitlines()[0][:100]} | |"
                )
                continue
            file_backed = f"{r['end_file_mb']:.0f}" if "end_file_mb" in r else "-"
            lines.append(
                f"| {row['name']} | {trainer} | {row['weights_dtype']} | {r['before_load_mb']:.0f} | "
                f"{r['load_peak_mb']:.0f} | {r['train_peak_mb']:.0f} | {r['train_peak_mb'] - r['before_load_mb']:.0f} "
                f"| {file_backed} | {r['tokens_per_s']:.0f} | {r['steady_tokens_per_s']:.0f} | "
                f"{r['steady_tokens_per_cpu_s']:.0f} | {r['losses'][-1]:.4f} | {r['wall_s']:.0f} |"
            )
    lines += ["", "Estimated parts (MiB):", "", "| row | weights | gradients | optimizer | forward+backward | peak |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in results["rows"]:
        e = row["estimate"]
        fb = e["forward_backward"] if e["forward_backward"] is not None else e["activations"] + e["logits"]
        lines.append(f"| {row['name']} | {e['weights'] / 2**20:.0f} | {e['gradients'] / 2**20:.0f} | "
                     f"{e['optimizer'] / 2**20:.0f} | {fb / 2**20:.0f} | {e['peak'] / 2**20:.0f} |")  # fmt: skip
    lines += ["", "Notes:"]
    lines += [f"- {note}" for note in measured_notes(cuda)]
    if results["problems"]:
        lines += ["", "MISMATCHES:", *(f"- {p}" for p in results["problems"])]
    return "\n".join(lines) + "\n"


def measured_notes(cuda: bool) -> list[str]:
    notes = [
        "TRL (1.x) always computes its loss through its own fused LM head (trl.trainer.utils.add_fused_lm_head: "
        "the log-probabilities in vocabulary tiles, recomputed in backward, the logits never kept), so each of its "
        "rows has a chunked loss; its '+ chunked loss' row runs the settings of the row above it again.",
        "TRL casts the LoRA adapters of a quantized model to bf16 (its QLoRA rows); ours stay fp32.",
        "Same initial weights, tokens and assistant targets in both trainers: checked for every row (MISMATCHES "
        "below otherwise).",
    ]
    if not cuda:
        notes += [
            "Activation offload moves activations from GPU to host memory: a GPU-only lever (the recipe refuses it on "
            "CPU); see `--estimate` and `--gpu`.",
            "The rows before '+ chunked loss' train ours with the plain loss (full logits, their log-softmax and "
            "gradient in fp32) against TRL's chunked head: that is most of the difference between the two there.",
            "File-backed at the end: RSS that is pages of the checkpoint, which safetensors maps. Weights loaded in "
            "their stored dtype are views of that map until written: in the LoRA rows the whole checkpoint, and in "
            "the QLoRA rows too, as the embedding's view keeps the file mapped, the fp32 originals of the quantized "
            "layers included. Those pages are clean (the kernel can drop them under pressure) and are not in the "
            "estimate; they are why the QLoRA rows' RSS is no lower than LoRA's here.",
        ]
    return notes


def estimate_tables() -> dict:
    """estimate_memory for every model, row and shape (bf16 mixed precision, CUDA), and torchtune's 8B setting."""
    from transformers import AutoConfig

    tables = {}
    for model, folder in ESTIMATED_MODELS.items():
        config = AutoConfig.from_pretrained(MODEL_CONFIGS / folder)
        rows = []
        for name, levers in lever_rows("cuda"):
            cells = {shape: estimate(config, levers, b, seq, "cuda", "bf16").peak for shape, (b, seq) in
                     ESTIMATED_SHAPES.items()}  # fmt: skip
            rows.append({"name": name, "weights_dtype": weights_dtype(levers, "bf16"), "peak": cells})
        tables[model] = rows
    config = AutoConfig.from_pretrained(MODEL_CONFIGS / ESTIMATED_MODELS["Llama-3.1-8B"])
    b, seq = ESTIMATED_SHAPES["batch 2 x 2,048 (packed)"]
    torchtune = [
        {"name": name, "torchtune_gib": published, "levers": {**NO_LEVERS, **levers},
         "peak": estimate(config, {**NO_LEVERS, **levers}, b, seq, "cuda", "bf16").peak}
        for name, published, levers in TORCHTUNE_8B
    ]  # fmt: skip
    return {"models": tables, "torchtune_8b": torchtune, "date": time.strftime("%Y-%m-%d")}


def smallest_card(peak: int) -> str:
    need = peak / 2**30 + CUDA_CONTEXT_GIB
    return next((f"{card}+" for card, gib in CARDS.items() if need <= gib), "none of them")


def estimate_report(results: dict) -> str:
    shapes = list(ESTIMATED_SHAPES)
    lines = [
        f"Estimated peak GiB per GPU (finetune.plan.memory_estimate, {results['date']}): bf16 mixed precision on "
        "CUDA, one process; full and LoRA rows with bf16 weights, QLoRA rows with fp32 adapters on the nf4 base. "
        f"Fits: the smallest card whose memory holds the estimate + {CUDA_CONTEXT_GIB} GiB for the CUDA context "
        f"(cards of {', '.join(CARDS)}; an 80 GB card has {CARDS['80 GB']} GiB). The estimate is what "
        "torch.cuda.max_memory_allocated would report: the allocator's cache and fragmentation come on top.",
        "",
    ]
    for model, rows in results["models"].items():
        lines += [f"**{model}**", "", f"| row | weights | {shapes[0]} GiB | fits | {shapes[1]} GiB | fits |",
                  "| --- | --- | ---: | --- | ---: | --- |"]  # fmt: skip
        for row in rows:
            cells = " | ".join(f"{row['peak'][s] / 2**30:.1f} | {smallest_card(row['peak'][s])}" for s in shapes)
            lines.append(f"| {row['name']} | {row['weights_dtype']} | {cells} |")
        lines.append("")
    lines += [
        "**Llama-3.1-8B beside torchtune's published peaks** (its README: batch 2, packed 2,048 tokens, torch.compile, "
        "one RTX 4090, its llama3_1/8B_*_single_device configs). Ours with the same levers: activation checkpointing, "
        "a chunked loss, torchtune's LoRA (r 8, alpha 16, dropout 0; q, v, output projections and the MLP), for full "
        "fine-tuning paged 8-bit AdamW. Where they differ: torchtune's full recipe steps the optimizer inside "
        "backward (no gradients held: 15 GiB less for 8B in bf16), and bitsandbytes' paged states live in CUDA "
        "unified memory, outside what torch.cuda.max_memory_allocated reports (another 15 GiB); the estimate "
        "counts both.",
        "",
        "| torchtune row | torchtune GiB | our levers | our estimate GiB |",
        "| --- | ---: | --- | ---: |",
    ]
    for row in results["torchtune_8b"]:
        levers = ", ".join(describe_lever(k, v) for k, v in row["levers"].items() if v and v != "adamw")
        lines.append(f"| {row['name']} | {row['torchtune_gib']} | {levers} | {row['peak'] / 2**30:.1f} |")
    return "\n".join(lines) + "\n"


def describe_lever(key: str, value) -> str:
    if isinstance(value, dict):  # LoRA settings
        return f"{key} r {value['r']} dropout {value['dropout']} on {'/'.join(value['target_modules'])}"
    return key if value is True else f"{key}={value}"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def prepare() -> None:
    """Wheels of the versions installed here for the GPU machine, in .gpu_carry/wheels: gpu_sft.py's (datasets & co.,
    trl) and bitsandbytes."""
    from importlib.metadata import version

    import gpu_sft

    gpu_sft.prepare()
    pin = f"bitsandbytes=={version('bitsandbytes')}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(gpu_sft.CARRY / "wheels"), pin], check=True
    )
    print(f"and {pin}: carry .gpu_carry along with --gpu")


def gpu_ready() -> bool:
    """Install what .gpu_carry/ holds and this repo; fail loudly on a missing requirement. Whether trl imports."""
    from gpu_check import install_carried

    install_carried()
    found = {m: subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True).returncode == 0
             for m in [*GPU_NEEDS, "trl"]}  # fmt: skip
    if missing := [m for m in GPU_NEEDS if not found[m]]:
        raise SystemExit(f"cannot run: {', '.join(missing)} missing. Run `python benchmarks/memory_levers.py "
                         "--prepare` on a machine with PyPI and carry .gpu_carry/ along.")  # fmt: skip
    if not found["trl"]:
        print("trl does not import here: the recipe's rows only", flush=True)
    return found["trl"]


def write(results: dict, text: str, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    print(f"written to {out_dir / name}.{{json,md}}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and tokenizer is local
    if len(sys.argv) > 1 and sys.argv[1] == "--recipe-worker":  # under accelerate launch
        stats, device, rest = Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
        return recipe_worker(stats, device, rest[rest.index("--") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 2 steps, results in a tmp dir")
    parser.add_argument("--estimate", action="store_true", help="estimated peaks of real models (no weights)")
    parser.add_argument("--gpu", action="store_true", help="measured on one CUDA GPU")
    parser.add_argument("--prepare", action="store_true", help="download the wheels the GPU image lacks")
    parser.add_argument("--layers", type=int, help="CPU model's layers (default 4)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: CPU 4, --quick 2, --gpu 6)")
    parser.add_argument("--micro-batch", type=int, help="micro-batch size (default: CPU 1, --gpu 2)")
    parser.add_argument("--no-trl", action="store_true", help="the recipe's rows only")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --quick: a tmp dir)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--make-model", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return print(json.dumps(trl_worker(json.loads(args.trl_worker))))
    if args.make_model:
        path, device, sizes, seq = args.make_model
        return make_model(Path(path), json.loads(sizes), max(int(seq), 1024), device)
    if args.prepare:
        return prepare()
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="memory_levers_")) if args.quick else REPO / "benchmarks/results"
    )
    if args.estimate:
        results = estimate_tables()
        return write(results, estimate_report(results), out_dir, "memory_levers_estimate")
    setup = dict(SETUPS["gpu" if args.gpu else "quick" if args.quick else "cpu"])
    setup["model"] = {**setup["model"], **({"layers": args.layers} if args.layers else {})}
    setup["steps"], setup["micro"] = args.steps or setup["steps"], args.micro_batch or setup["micro"]
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run --gpu on the GPU machine (the CPU rows are the default mode)")
        print("Verifies: on a CUDA GPU, every memory lever of recipes/sft.py trains (bf16 mixed precision, 1B "
              "LLaMA, batch 2 x 2,048), and estimate_memory's peak beside torch.cuda.max_memory_allocated.",
              flush=True)  # fmt: skip
        results = measure(setup, "cuda", with_trl=gpu_ready() and not args.no_trl)
        write(results, measured_report(results), out_dir, "memory_levers_gpu")
    else:
        results = measure(setup, "cpu", with_trl=not args.no_trl)
        write(results, measured_report(results), out_dir, "memory_levers")
    failed = [f"{row['name']} ({t})" for row in results["rows"] for t in ("ours", "trl") if "error" in row.get(t, {})]
    if failed or results["problems"]:
        raise SystemExit(f"FAILED: {', '.join(failed)}; mismatches: {results['problems']}")


if __name__ == "__main__":
    main()
