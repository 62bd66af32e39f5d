"""Benchmark: recipes/dpo.py against TRL's DPOTrainer, same model, pairs and optimisation; CPU here, or one CUDA GPU.

    # once: TRL in a venv of its own (the project's .venv stays as it is; .venv* is git-ignored)
    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 \
        && .venv-bench/bin/pip install -e . trl "bitsandbytes>=0.50"
    .venv-bench/bin/python benchmarks/dpo_vs_trl.py                # CPU, ~5 minutes: results/dpo_vs_trl.{md,json}
    .venv-bench/bin/python benchmarks/dpo_vs_trl.py --quick        # smoke run: tiny model, 4 steps, a tmp dir
    .venv-bench/bin/python benchmarks/dpo_vs_trl.py --prepare      # here: wheels the GPU image lacks -> .gpu_carry/
    .venv-bench/bin/python benchmarks/dpo_vs_trl.py --gpu --dry-run  # here: GPU rows' pairs, configs, dry runs
    python benchmarks/dpo_vs_trl.py --gpu                          # one CUDA GPU, < 10 minutes on an H100

CPU (default): sft_vs_trl.py's LLaMA with LLaMA-2's 32k vocabulary (hidden 256, 8 layers, 14.5M parameters, 8.2M of them
the tied embedding), random weights written once as an fp32 safetensors checkpoint that every run loads (same initial
weights, checked), the demo's character tokenizer (recipes/demo/tiny_llama: one token a character). Synthetic chat pairs
with an explicit prompt: the user asks to reverse a string of 49-99 letters after 40-100 letters of filler (prompts of
103-213 tokens), the chosen answer is the reversal, the rejected one as many letters (+-5) drawn at random (completions
of 45-105 tokens with the end-of-turn token); max length 320 (no pair is cut: TRL 1.16 has no max_prompt_length, it cuts
the end of a sequence), beta 0.1, sigmoid loss, 2 pairs per micro-batch x 2 micro-batches per optimizer step, one epoch
of steps x 4 pairs, AdamW (fused) without weight decay, cosine schedule after 2 warm-up steps, clipping at 1.0, fp32,
dropout off, one process with every core's thread, padded batches in both (TRL 1.16 ignores padding_free).

Rows: LoRA (r 8, alpha 16, dropout 0.05 -> 0, every linear layer), reference = the model with its adapters off in
both (ours: dpo.reference=auto -> adapter_off; TRL: peft_config, ref_model=None); full fine-tuning, ours with the
reference log-probs computed in one pass before training (auto -> precomputed, cache in a fresh dir: computed, not
read), TRL with its default reference (a second copy of the model, loaded from the same checkpoint) and with
precompute_ref_log_probs=True (its pass over the training pairs in __init__). Both reference passes run in batches of
8 pairs; ours covers the validation pairs too. Each run is a fresh process, the rows of a mode back to back: ours
through `accelerate launch`, TRL as a worker of this script.

Measured the same way in both: a forward pre-hook on the decoder (see sft_vs_trl.py's ForwardMeter) counts the tokens
of every training forward of the policy (the attention mask's ones: prompt + chosen and prompt + rejected, no padding;
reference forwards run without gradients and are not counted) and stamps the clock and the process's CPU time at the
first micro-batch of each optimizer step. Steady tokens/s: steps 3..last-1 over their wall time; tokens/CPU-s: the
same over the process's CPU time (less sensitive to other work on the machine); the reference pass: its wall time
(ours: finetune.preference.reference.precompute_reference; TRL: DPOTrainer._precompute_ref_logps), and tokens/s over
training + that pass. Memory (see memory_levers.py's MemoryMarks): RSS before the model loads, peak up to the start of
training (loading, reference pass), peak in training; the process's peak is the larger. On a GPU the same marks read
torch.cuda.max_memory_allocated (the recipe's eval_results memory_mb.peak, checked beside it).

--gpu: a random-weight model with Llama-3.2-1B's shapes (benchmarks/model_configs/llama-3.2-1b/config.json: 1.24B
parameters, 128k vocabulary) saved in bf16, pairs 4x longer (prompts of 363-813 tokens, completions of 145-305), max
length 1,152, 4 pairs x 2 micro-batches per step, 16 steps, bf16 mixed precision; rows LoRA (bf16 base weights, fp32
adapters; TRL the same) and QLoRA (nf4 with double quantization, bf16 compute; ours model.quantization=nf4, TRL a
BitsAndBytesConfig; TRL casts the adapters to bf16, ours keep them fp32), each ours then TRL within an 8-minute budget.
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
import memory_levers as levers  # noqa: E402  (benchmarks/ is not a package)
import sft_vs_trl as bench  # noqa: E402

REPO = bench.REPO
RECIPE = REPO / "recipes" / "dpo.py"
CONFIG = REPO / "recipes" / "configs" / "dpo" / "default.yaml"
LLAMA_1B_CONFIG = REPO / "benchmarks" / "model_configs" / "llama-3.2-1b" / "config.json"
BETA, SEED, WARMUP, SCHEDULER, VALIDATION_PAIRS, REFERENCE_BATCH = 0.1, 42, 2, "cosine", 8, 8
LR = {"lora": 5e-4, "full": 5e-5}
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}  # the recipe's defaults

SETUPS = {  # model; pairs: filler letters, word letters, max length / prompt; batch; steps; warm-up steps left out
    "cpu": {"model": bench.CPU_MODEL,  # sft_vs_trl's: 14.5M parameters, 8.2M of them the embedding
            "filler": (40, 100), "word": (49, 99), "max_length": 320, "max_prompt_length": 256, "micro": 2,
            "accumulation": 2, "steps": 16, "excluded": 2, "device": "cpu", "timeout": 900},
    "quick": {"model": {"vocab": 4096, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256},
              "filler": (40, 100), "word": (49, 99), "max_length": 320, "max_prompt_length": 256, "micro": 2,
              "accumulation": 2, "steps": 4, "excluded": 1, "device": "cpu", "timeout": 300},
    "gpu": {"model": None,  # Llama-3.2-1B's shapes, read from LLAMA_1B_CONFIG
            "filler": (200, 500), "word": (149, 299), "max_length": 1152, "max_prompt_length": 896, "micro": 4,
            "accumulation": 2, "steps": 16, "excluded": 3, "device": "cuda", "timeout": 150, "budget": 480},
}  # fmt: skip

# (row, trainer, settings): the CPU rows, each mode's back to back; the GPU rows
CPU_ROWS = [
    ("LoRA", "ours", {"lora": True}),
    ("LoRA", "trl", {"lora": True}),
    ("full", "ours", {"lora": False}),
    ("full", "trl", {"lora": False, "trl_precompute": False}),
    ("full", "trl precomputed", {"lora": False, "trl_precompute": True}),
]
GPU_ROWS = [
    ("LoRA", "ours", {"lora": True}),
    ("LoRA", "trl", {"lora": True}),
    ("QLoRA nf4", "ours", {"lora": True, "quantization": "nf4"}),
    ("QLoRA nf4", "trl", {"lora": True, "quantization": "nf4"}),
]
REFERENCE = {"ours": {True: "adapter off", False: "precomputed (one pass before training)"},
             "trl": {True: "adapter off", False: "a second model (frozen copy)"},
             "trl precomputed": {False: "precomputed (one pass in __init__)"}}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


def preference_pairs(n: int, filler: tuple[int, int], word: tuple[int, int], seed: int) -> list[dict]:
    """`n` chat pairs with an explicit prompt: "<filler letters and spaces>\\nreverse: <word>"; chosen = the word
    reversed, rejected = as many letters (+-5) at random. With the demo's character tokenizer a prompt is
    filler + word + 14 tokens (BOS, role tokens, end of turn, "reverse: "), a completion its letters + end of turn."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    rows = []
    for _ in range(n):
        w = "".join(rng.choices(letters, k=rng.randint(*word)))
        f = "".join(rng.choice(letters + " ") for _ in range(rng.randint(*filler)))
        rejected = "".join(rng.choices(letters, k=max(1, len(w) + rng.randint(-5, 5))))
        rows.append({
            "prompt": [{"role": "user", "content": f"{f}\nreverse: {w}"}],
            "chosen": [{"role": "assistant", "content": w[::-1]}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip
    return rows


def llama_1b_sizes() -> dict:
    """The sizes of benchmarks/model_configs/llama-3.2-1b/config.json, in bench.write_model_dir's terms."""
    c = json.loads(LLAMA_1B_CONFIG.read_text())
    return {"vocab": c["vocab_size"], "hidden": c["hidden_size"], "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"], "kv_heads": c["num_key_value_heads"],
            "intermediate": c["intermediate_size"]}  # fmt: skip


def make_model(path: Path, sizes: dict, max_positions: int, device: str, dtype: str) -> None:
    """A LLaMA of `sizes` with random weights (seed SEED) and the demo's chat tokenizer, saved as a safetensors
    checkpoint in `dtype` that every run loads (in a subprocess: the driver holds neither weights nor CUDA)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    bench.write_model_dir(path, sizes, max_positions=max_positions)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.to(getattr(torch, dtype)).save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Measuring inside the training process (both trainers)
# ---------------------------------------------------------------------------------------------


class PairMeter(bench.ForwardMeter):
    """sft_vs_trl's ForwardMeter counting the attention mask's ones (every real token, whatever the pad id: the
    demo tokenizer's end of turn is TRL's pad when a tokenizer has none), or every id without a mask."""

    def __init__(self, accumulation: int):
        super().__init__(pad_token_id=-1, accumulation=accumulation)

    def _hook(self, module, args, kwargs) -> None:
        import torch

        if not (self.on and module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids")
        ids = args[0] if ids is None else ids
        if len(self.tokens) % self.k == 0:
            if ids.is_cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
        mask = kwargs.get("attention_mask")
        self.tokens.append(mask.sum() if mask is not None else torch.tensor(ids.numel()))
        self.padded.append(ids.numel())

    def record(self) -> dict:
        return {"tokens": [int(t) for t in self.tokens], "padded": self.padded, "stamps": self.stamps,
                "cpu_stamps": self.cpu_stamps}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict, accumulation: int) -> PairMeter:
        meter = cls(accumulation)
        meter.tokens, meter.padded, meter.stamps, meter.cpu_stamps = (
            record[k] for k in ("tokens", "padded", "stamps", "cpu_stamps")
        )
        return meter


def recipe_worker(stats: Path, device: str, accumulation: int, recipe_args: list[str]) -> None:
    """recipes/dpo.py in this process (under `accelerate launch`), with a PairMeter on its model, MemoryMarks where
    the loop reads its memory (start and end of training), and the reference pass timed."""
    import psutil

    import finetune.core.modeling
    import finetune.preference.reference
    import finetune.training.loop

    marks, record = levers.MemoryMarks(device), {"reference_s": 0.0}
    original_load, original_memory = finetune.core.modeling.load_causal_lm, finetune.training.loop.memory_mb
    original_precompute = finetune.preference.reference.precompute_reference
    meter: PairMeter | None = None

    def load_causal_lm(cfg, tokenizer, *args, **kwargs):
        nonlocal meter
        marks.before_load()
        model = original_load(cfg, tokenizer, *args, **kwargs)
        meter = PairMeter(accumulation)
        meter.attach(model)
        record["init_checksum"] = levers.weights_checksum(model)
        return model

    def memory_mb(accelerator_device):
        if "load_peak_mb" in marks.marks:
            marks.training_ends()
            record["launcher_rss_mb"] = psutil.Process().parent().memory_info().rss / 2**20
        else:
            marks.training_starts()
        return original_memory(accelerator_device)

    def precompute_reference(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_precompute(*args, **kwargs)
        finally:
            record["reference_s"] += time.perf_counter() - start

    finetune.core.modeling.load_causal_lm, finetune.training.loop.memory_mb = load_causal_lm, memory_mb
    finetune.preference.reference.precompute_reference = precompute_reference
    sys.argv = [str(RECIPE), *recipe_args]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    finally:
        record["marks"] = marks.marks
        if meter is not None:
            record["meter"] = meter.record()
        stats.write_text(json.dumps(record))


def trl_worker(spec: dict) -> dict:
    """One DPOTrainer run (one epoch) as `spec` says; returns what the driver compares."""
    import torch
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from finetune.core.precision import WEIGHT_DTYPES
    from finetune.core.quantization import compute_dtype, import_bitsandbytes

    device, mixed = spec["device"], spec["mixed_precision"]
    if device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the recipe does with one process
    if spec.get("quantization"):
        import_bitsandbytes()  # as the recipe imports it: without the Hub lookup of a CPU kernel
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    marks = levers.MemoryMarks(device)
    marks.before_load()
    if spec.get("quantization"):
        dtype = compute_dtype(mixed, spec["weights_dtype"])
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quantization"],
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)  # fmt: skip
        loading = {"quantization_config": quantized, "device_map": {"": torch.device(device)}}
    else:
        dtype, loading = WEIGHT_DTYPES[spec["weights_dtype"]], {}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, **loading)
    meter = PairMeter(spec["accumulation"])
    meter.attach(model)
    init_checksum = levers.weights_checksum(model)

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

    reference_s = 0.0
    original_precompute = DPOTrainer._precompute_ref_logps

    def precompute(self, *args, **kwargs):
        nonlocal reference_s
        start = time.perf_counter()
        try:
            return original_precompute(self, *args, **kwargs)
        finally:
            reference_s += time.perf_counter() - start

    DPOTrainer._precompute_ref_logps = precompute
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        lora = spec["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    args = DPOConfig(**trl_arguments(spec))
    train = load_dataset("json", data_files=spec["train"], split="train")
    clock = Clock()
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    setup_s = time.perf_counter() - start
    prepared = trainer.train_dataset
    trainer.train()
    meter.on = False
    return {
        **meter.summary(trainer.state.global_step, spec["excluded"], clock.seconds),
        "steps": trainer.state.global_step,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "init_checksum": init_checksum,
        **marks.marks,
        "reference_s": reference_s,
        "trainer_init_s": setup_s,
        "has_ref_model": trainer.ref_model is not None,
        "data_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in
                           zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True)),
        "pairs": len(prepared),
    }  # fmt: skip


def trl_arguments(spec: dict) -> dict:
    """DPOConfig's arguments for `spec`: the recipe's settings in TRL's names (its defaults differ: bf16 and
    gradient checkpointing on, lr 1e-6)."""
    return {
        "output_dir": spec["out"],
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "bf16": spec["mixed_precision"] == "bf16",
        "fp16": False,
        "gradient_checkpointing": False,
        "num_train_epochs": 1,
        "per_device_train_batch_size": spec["micro"],
        "gradient_accumulation_steps": spec["accumulation"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": spec["scheduler"],
        "warmup_steps": spec["warmup"],
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused",
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": spec["max_length"],
        "beta": spec["beta"],
        "loss_type": ["sigmoid"],
        "disable_dropout": True,
        "padding_free": False,
        "precompute_ref_log_probs": bool(spec.get("trl_precompute")),
        "precompute_ref_batch_size": spec["reference_batch"],
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def recipe_args(spec: dict) -> list[str]:
    """recipes/dpo.py's arguments for `spec` (one epoch), over recipes/configs/dpo/default.yaml."""
    keys = {
        "model.name_or_path": spec["model"],
        "model.random_init": False,  # the checkpoint TRL loads too
        "model.quantization": spec.get("quantization") or "null",
        "data.train": spec["train"],
        "data.validation": spec["validation"],
        "data.max_length": spec["max_length"],
        "data.max_prompt_length": spec["max_prompt_length"],
        "dpo.loss": "sigmoid",
        "dpo.beta": spec["beta"],
        "dpo.reference": "auto",  # LoRA: adapter_off; full: precomputed
        "dpo.reference_batch_size": spec["reference_batch"],
        "dpo.padding_free": False,
        "train.epochs": 1,
        "train.max_steps": "null",
        "train.micro_batch_size": spec["micro"],
        "train.global_batch_size": spec["micro"] * spec["accumulation"],  # one process: the accumulation
        "train.lr": spec["lr"],
        "train.lr_scheduler": spec["scheduler"],
        "train.warmup_steps": spec["warmup"],
        "train.weight_decay": 0,
        "train.max_grad_norm": 1.0,
        "train.seed": spec["seed"],
        "train.weights_dtype": spec["weights_dtype"],
        "train.chunked_loss": True,
        "lora.enabled": bool(spec["lora"]),
        "eval.every_n_steps": "null",
        "eval.num_generations": 0,
        "eval.batch_size": spec["reference_batch"],
        "checkpoint.every_n_steps": "null",
        "logging.trackers": "[]",
        "logging.every_n_steps": 1,
        "logging.progress_bar": "never",
        "output.dir": spec["out"],
    }
    if spec["device"] == "cpu":
        keys["train.cpu_threads"] = len(os.sched_getaffinity(0))
    if spec["lora"]:
        keys.update({f"lora.{k}": v for k, v in spec["lora"].items()})
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    return ["--config", str(CONFIG), *args]


def run_env(spec: dict) -> None:
    """Fresh caches for each run: our token and reference caches and TRL's datasets cache (its precomputed
    reference log-probs are a datasets cache file), so every reference pass computes."""
    root = Path(spec["out"] + ".cache")
    os.environ["FINETUNE_CACHE"] = str(root / "finetune")
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")


def run_recipe(spec: dict) -> dict:
    out = Path(spec["out"])
    stats = out.parent / f"{out.name}.stats.json"
    cmd = [*bench.launch_command(spec["mixed_precision"]), __file__, "--recipe-worker", str(stats), spec["device"],
           str(spec["accumulation"]), "--", *recipe_args(spec)]  # fmt: skip
    run_env(spec)
    start, load = time.perf_counter(), bench.load_average()
    bench._run(cmd, spec)
    wall = time.perf_counter() - start
    r = json.loads((out / "eval_results.json").read_text())
    record = json.loads(stats.read_text())
    meter = PairMeter.from_record(record["meter"], spec["accumulation"])
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    tokens = re.search(r"([\d,]+) tokens$", r["train_data"])
    shutil.rmtree(out, ignore_errors=True)  # final/ holds the whole model
    return {
        **meter.summary(r["step"], spec["excluded"], r["train_runtime_s"]),
        "steps": r["step"],
        "losses": [loss for loss in losses if loss is not None],
        "init_checksum": record["init_checksum"],
        **record["marks"],
        "reference_s": record["reference_s"],
        "launcher_rss_mb": record.get("launcher_rss_mb"),
        "recipe_memory_mb": r["memory_mb"],
        "reference": r.get("reference"),
        "data_tokens": int(tokens.group(1).replace(",", "")),
        "wall_s": wall,
        "load_average": [load, bench.load_average()],
    }


def run_trl(spec: dict) -> dict:
    run_env(spec)
    start, load = time.perf_counter(), bench.load_average()
    result = bench._run([sys.executable, __file__, "--trl-worker", json.dumps(spec)], spec)
    shutil.rmtree(spec["out"], ignore_errors=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start,
            "load_average": [load, bench.load_average()]}  # fmt: skip


def check_pair(ours: dict, trl: dict) -> list[str]:
    problems = []
    if ours["init_checksum"] != trl["init_checksum"]:
        problems.append(f"initial weights differ ({ours['init_checksum']} vs {trl['init_checksum']})")
    if not ours["tokens"] == trl["tokens"] == ours["data_tokens"] == trl["data_tokens"]:
        problems.append(f"tokens differ: ours {ours['tokens']} (data {ours['data_tokens']}), TRL {trl['tokens']} "
                        f"(data {trl['data_tokens']})")  # fmt: skip
    if ours["steps"] != trl["steps"]:
        problems.append(f"optimizer steps differ: ours {ours['steps']}, TRL {trl['steps']}")
    return problems


def setting_for(setup: dict) -> dict:
    """The pairs, sizes and lengths a setup's runs share."""
    s = dict(setup)
    s["model"] = s["model"] or llama_1b_sizes()
    return s


def prepare_inputs(setup: dict, work: Path, weights: bool) -> dict:
    """The pairs (train: steps x pairs per step; validation), and the model dir (with `weights`: the checkpoint,
    built in a subprocess on the setup's device); the specs' common part."""
    pairs = setup["steps"] * setup["micro"] * setup["accumulation"]
    train = bench.write_jsonl(work / "train.jsonl", preference_pairs(pairs, setup["filler"], setup["word"], SEED))
    validation = bench.write_jsonl(
        work / "validation.jsonl", preference_pairs(VALIDATION_PAIRS, setup["filler"], setup["word"], SEED + 1)
    )
    model_dir = work / "model"
    max_positions = max(setup["max_length"], 1024)
    if weights:
        dtype = "bfloat16" if setup["device"] == "cuda" else "float32"
        made = subprocess.run([sys.executable, __file__, "--make-model", str(model_dir), setup["device"],
                               json.dumps(setup["model"]), str(max_positions), dtype], cwd=REPO, capture_output=True,
                              text=True)  # fmt: skip
        if made.returncode:
            raise SystemExit(f"could not build the model:\n{(made.stdout + made.stderr)[-3000:]}")
    else:
        bench.write_model_dir(model_dir, setup["model"], max_positions=max_positions)
    cuda = setup["device"] == "cuda"
    return {
        "model": str(model_dir), "train": str(train), "validation": str(validation), "pairs": pairs,
        "max_length": setup["max_length"], "max_prompt_length": setup["max_prompt_length"], "micro": setup["micro"],
        "accumulation": setup["accumulation"], "scheduler": SCHEDULER, "warmup": WARMUP, "seed": SEED, "beta": BETA,
        "reference_batch": REFERENCE_BATCH, "excluded": setup["excluded"], "device": setup["device"],
        "mixed_precision": "bf16" if cuda else "no",
    }  # fmt: skip


def row_spec(common: dict, row: str, trainer: str, settings: dict, work: Path, timeout: float) -> dict:
    lora = dict(LORA) if settings["lora"] else None
    cuda = common["device"] == "cuda"
    # under bf16: LoRA over pure-bf16 base weights (adapters fp32), QLoRA fp32 adapters on the 4-bit base
    weights = "bf16" if cuda and not settings.get("quantization") else "fp32"
    return {**common, **settings, "lora": lora, "lr": LR["lora" if lora else "full"], "weights_dtype": weights,
            "name": f"{row} ({trainer})", "trainer": trainer, "row": row, "timeout": timeout,
            "out": str(work / re.sub(r"\W+", "_", f"{row} {trainer}"))}  # fmt: skip


def measure(setup: dict, rows: list, with_trl: bool) -> dict:
    from importlib.metadata import version

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    runs: list[dict] = []
    try:
        common = prepare_inputs(setup, work, weights=True)
        print(f"model and pairs ready in {time.perf_counter() - start:.0f} s ({work})", flush=True)
        started = bench.load_average()
        for row, trainer, settings in rows:
            if trainer != "ours" and not with_trl:
                continue
            left = setup.get("budget", float("inf")) - (time.perf_counter() - start)
            spec = row_spec(common, row, trainer, settings, work, min(setup["timeout"], left))
            entry = {"row": row, "trainer": trainer, "settings": settings}
            if left < 40:
                entry["error"] = "not run: the time budget is spent"
            else:
                try:
                    entry.update((run_recipe if trainer == "ours" else run_trl)(spec))
                except bench.RunFailed as err:
                    entry["error"] = str(err)
            runs.append(entry)
            print(progress_line(entry), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    problems = []
    for entry in runs:
        ours = next((r for r in runs if r["row"] == entry["row"] and r["trainer"] == "ours"), None)
        if entry["trainer"] != "ours" and ours and "error" not in ours and "error" not in entry:
            problems += [f"{entry['row']} ({entry['trainer']}): {p}" for p in check_pair(ours, entry)]
    total, head = bench.parameter_count(setup["model"])
    packages = ["torch", "transformers", "accelerate", "peft", *(["trl"] if with_trl else [])]
    if setup["device"] == "cuda":
        packages.append("bitsandbytes")
    return {
        "settings": {
            **{k: v for k, v in setup.items() if k not in ("timeout", "budget")},
            "parameters": total,
            "output_layer_parameters": head,
            "pairs": common["pairs"],
            "validation_pairs": VALIDATION_PAIRS,
            "lora": LORA,
            "lr": LR,
            "beta": BETA,
            "reference_batch": REFERENCE_BATCH,
            "machine": machine(setup["device"]),
            "versions": ", ".join(f"{name} {version(name)}" for name in packages),
            "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
            "load_average": {"start": started, "end": bench.load_average()},
            "total_s": round(time.perf_counter() - start),
        },
        "runs": runs,
        "problems": problems,
    }


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}, {len(os.sched_getaffinity(0))} CPU cores"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", lscpu)
    return f"{len(os.sched_getaffinity(0))} cores of {name.group(1).strip() if name else 'an unknown CPU'}"


def progress_line(r: dict) -> str:
    name = f"{r['row']} ({r['trainer']})"
    if "error" in r:
        return f"{name}: FAIL\n{r['error']}"
    return (f"{name}: {r['steady_tokens_per_s']:.0f} tokens/s steady ({r['steady_tokens_per_cpu_s']:.0f}/CPU-s), "
            f"{r['steps']} steps in {r['train_s']:.1f} s, reference pass {r['reference_s']:.1f} s, peak "
            f"{levers.peak_mb(r):.0f} MiB (training {r['train_peak_mb']:.0f}), loss {r['losses'][0]:.4f} -> "
            f"{r['losses'][-1]:.4f}, wall {r['wall_s']:.0f} s, load {r['load_average'][0][0]} -> "
            f"{r['load_average'][1][0]}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def report(results: dict) -> str:
    s = results["settings"]
    m = s["model"]
    cuda = s["device"] == "cuda"
    unit = "GiB allocated" if cuda else "RSS MiB"
    size = (lambda mb: f"{mb / 1024:.2f}") if cuda else (lambda mb: f"{mb:.0f}")
    loads = sorted(x for r in results["runs"] if _ok(r) for x in (r["load_average"][0][0], r["load_average"][1][0]))
    lines = [
        f"`{s['command']}`",
        "",
        f"{s['date']}; {s['machine']}; {s['versions']}; {s['total_s']} s in all"
        + (f"; 1-minute load average {loads[0]}-{loads[-1]} during the runs." if loads else "."),
        "",
        f"LLaMA {m['layers']} layers x {m['hidden']} hidden, MLP {m['intermediate']}, {m['heads']}/{m['kv_heads']} "
        f"heads, vocabulary {m['vocab']:,}, tied embeddings ({s['parameters'] / 1e6:,.1f}M parameters, "
        f"{s['output_layer_parameters'] / 1e6:,.1f}M of them the embedding), random weights from one checkpoint; "
        f"{s['pairs']} chat pairs (prompts of {s['filler'][0] + s['word'][0] + 14}-"
        f"{s['filler'][1] + s['word'][1] + 14} tokens, completions of {s['word'][0] - 4}-{s['word'][1] + 6}), "
        f"1 epoch, {s['micro']} pairs x {s['accumulation']} micro-batches per step, max length {s['max_length']}, "
        f"beta {s['beta']}, sigmoid loss, "
        f"lr {s['lr']['lora']:g} (LoRA r {s['lora']['r']}) / {s['lr']['full']:g} (full), cosine after {WARMUP} "
        f"warm-up steps, {'bf16 mixed precision' if cuda else 'fp32'}.",
        "",
        f"| row | trainer | reference | steps | tokens/s (steady) | tokens/CPU-s | ours / this | reference pass s "
        f"| tokens/s incl. the pass | train s | wall s | peak {unit} | peak in training | step-1 loss | last loss |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        ref = REFERENCE.get(r["trainer"], {}).get(bool(r["settings"]["lora"]), "")
        if not _ok(r):
            lines.append(f"| {r['row']} | {r['trainer']} | {ref} | | | | FAIL: {r['error'].splitlines()[0][:90]} "
                         "| | | | | | | | |")  # fmt: skip
            continue
        ours = next((x for x in results["runs"] if x["row"] == r["row"] and x["trainer"] == "ours"), None)
        ratio = ""
        if r["trainer"] != "ours" and _ok(ours):
            ratio = (f"{ours['steady_tokens_per_s'] / r['steady_tokens_per_s']:.2f}x tokens/s, "
                     f"{ours['steady_tokens_per_cpu_s'] / r['steady_tokens_per_cpu_s']:.2f}x tokens/CPU-s, "
                     f"{with_pass(ours) / with_pass(r):.2f}x incl. the pass, "
                     f"{levers.peak_mb(ours) / levers.peak_mb(r):.2f}x peak, "
                     f"{ours['train_peak_mb'] / r['train_peak_mb']:.2f}x peak in training")  # fmt: skip
        lines.append(
            f"| {r['row']} | {r['trainer']} | {ref} | {r['steps']} | {r['steady_tokens_per_s']:.0f} | "
            f"{r['steady_tokens_per_cpu_s']:.0f} | {ratio} | {r['reference_s']:.1f} | {with_pass(r):.0f} | "
            f"{r['train_s']:.1f} | {r['wall_s']:.0f} | {size(levers.peak_mb(r))} | {size(r['train_peak_mb'])} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
        )
    lines += [
        "",
        f"tokens/s (steady): the policy's training tokens (prompt + chosen and prompt + rejected, no padding) of "
        f"steps {s['excluded'] + 1}..last-1 over their wall time; tokens/CPU-s: the same over the process's CPU time "
        "(all threads). tokens/s incl. the pass: every training token / (training time + the reference pass). "
        "ours / this: ours over the row's (tokens: > 1 = ours faster; memory: < 1 = ours smaller). Peak: the "
        "training process's peak up to the end of training (model loading and the reference pass included); peak in "
        + (
            "training: max_memory_allocated at its end (not reset: the same as peak)."
            if cuda
            else "training: VmHWM reset when training starts (what the step itself holds, the model included)."
        ),
        "",
        "Where each run's memory went (MiB) and checks:",
        "",
        "| row | trainer | before load | peak while loading + reference pass | peak in training | "
        + ("recipe's memory_mb.peak" if cuda else "file-backed at the end | accelerate launcher RSS")
        + " | tokens trained | padding | TRL init s |",
        "| --- | --- | ---: | ---: | ---: | ---: |" + ("" if cuda else " ---: |") + " ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        if not _ok(r):
            continue
        extra = (f"{r['recipe_memory_mb']['peak']:.0f}" if r["trainer"] == "ours" else "-") if cuda else (
            f"{r.get('end_file_mb', 0):.0f} | "
            + (f"{r['launcher_rss_mb']:.0f}" if r.get("launcher_rss_mb") else "-"))  # fmt: skip
        init = f"{r['trainer_init_s']:.1f}" if "trainer_init_s" in r else "-"
        lines.append(
            f"| {r['row']} | {r['trainer']} | {r['before_load_mb']:.0f} | {r['load_peak_mb']:.0f} | "
            f"{r['train_peak_mb']:.0f} | {extra} | {r['tokens']:,} | {r['padding_share']:.1%} | {init} |"
        )
    lines += [
        "",
        "Checks: "
        + (
            "every TRL run has the same initial weights, tokens and optimizer steps as ours."
            if not results["problems"]
            else "MISMATCHES:"
        ),
    ]
    lines += [f"- {p}" for p in results["problems"]]
    for r in results["runs"]:
        ours = next((x for x in results["runs"] if x["row"] == r["row"] and x["trainer"] == "ours"), None)
        if r["trainer"] != "ours" and _ok(r) and _ok(ours) and len(r["losses"]) == len(ours["losses"]):
            gap = max(abs(a - b) for a, b in zip(ours["losses"], r["losses"], strict=True))
            lines.append(f"- {r['row']}, ours against {r['trainer']}: the training loss of every one of the "
                         f"{len(r['losses'])} steps differs by at most {gap:.1e}")  # fmt: skip
    lines += ["", "Notes:", *(f"- {note}" for note in notes(cuda))]
    return "\n".join(lines) + "\n"


def notes(cuda: bool) -> list[str]:
    out = [
        "Our reference pass covers the validation pairs too (ours: train + validation; TRL, given no eval_dataset: "
        "train only); both in batches of the same number of pairs.",
        "TRL's reference pass runs inside DPOTrainer.__init__ (TRL init s), ours between loading and training.",
    ]
    if not cuda:
        out.append(
            "On a CPU, TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) scores every position of every "
            "sequence, prompt and padding included (it keeps only the completion positions where Triton runs: CUDA, "
            "XPU), and computes entropy, mean logit and top-1 beside the log-probs; ours computes the log-probs of the "
            "completion tokens only. With a 32k vocabulary that head is much of the work per token here, less so on "
            "a GPU with a 1B model."
        )
    return out


def with_pass(r: dict) -> float:
    return r["tokens"] / (r["train_s"] + r["reference_s"])


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def gpu_dry_run(setup: dict, with_trl: bool) -> None:
    """--gpu --dry-run, anywhere: the GPU rows' pairs and model dir (config and tokenizer, no weights), the recipe's
    own --dry-run for each of our rows (config, pairs, chat template, batches, memory estimate), TRL's DPOConfig and
    BitsAndBytesConfig built from each TRL row's arguments."""
    work = Path(tempfile.mkdtemp(prefix="dpo_vs_trl_dry_"))
    try:
        common = prepare_inputs(setup, work, weights=False)
        for row, trainer, settings in GPU_ROWS:
            spec = row_spec(common, row, trainer, settings, work, setup["timeout"])
            if trainer == "ours":
                cmd = [*bench.launch_command(spec["mixed_precision"]), str(RECIPE), "--dry-run", *recipe_args(spec)]
                result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                output = (result.stdout + result.stderr).strip()
                if result.returncode:
                    raise SystemExit(f"{spec['name']}: the recipe's dry run failed:\n{output[-3000:]}")
                print(f"{spec['name']}: recipe --dry-run ok\n  " + "\n  ".join(output.splitlines()[-12:]), flush=True)
            elif with_trl:
                import torch
                from transformers import BitsAndBytesConfig
                from trl import DPOConfig

                arguments = trl_arguments(spec)
                if not torch.cuda.is_available():  # DPOConfig refuses bf16 without a device that has it
                    arguments.update(use_cpu=True, bf16=False)
                DPOConfig(**arguments)
                if spec.get("quantization"):
                    BitsAndBytesConfig(
                        load_in_4bit=True,
                        bnb_4bit_quant_type=spec["quantization"],
                        bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16,
                    )
                print(f"{spec['name']}: DPOConfig ok", flush=True)
        print(f"dry run ok: {common['pairs']} pairs, model {setup['model']}; no weights built, nothing trained")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and tokenizer is local
    if len(sys.argv) > 1 and sys.argv[1] == "--recipe-worker":  # under accelerate launch
        stats, device, accumulation, rest = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:]
        return recipe_worker(stats, device, accumulation, rest[rest.index("--") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 4 steps, results in a tmp dir")
    parser.add_argument("--gpu", action="store_true", help="LoRA and QLoRA on one CUDA GPU, a 1B LLaMA")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: check everything, train nothing")
    parser.add_argument("--prepare", action="store_true", help="download the wheels the GPU image lacks")
    parser.add_argument("--steps", type=int, help="optimizer steps (one epoch of steps x pairs per step)")
    parser.add_argument("--no-trl", action="store_true", help="our rows only")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --quick: a tmp dir)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--make-model", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return print(json.dumps(trl_worker(json.loads(args.trl_worker))))
    if args.make_model:
        path, device, sizes, positions, dtype = args.make_model
        return make_model(Path(path), json.loads(sizes), int(positions), device, dtype)
    if args.prepare:
        return levers.prepare()  # gpu_sft's wheels (datasets & co., trl) and bitsandbytes, into .gpu_carry/wheels
    setup = setting_for(SETUPS["gpu" if args.gpu else "quick" if args.quick else "cpu"])
    setup["steps"] = args.steps or setup["steps"]
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else "python"
    command = " ".join([python, "benchmarks/dpo_vs_trl.py", *sys.argv[1:]])
    if args.gpu and args.dry_run:
        return gpu_dry_run(setup, with_trl=not args.no_trl)
    if args.dry_run:
        parser.error("--dry-run goes with --gpu")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="dpo_vs_trl_")) if args.quick else REPO / "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run --gpu on the GPU machine (--gpu --dry-run checks it here)")
        with_trl = levers.gpu_ready() and not args.no_trl
        results = measure(setup, GPU_ROWS, with_trl)
        name = "dpo_vs_trl_gpu"
    else:
        results = measure(setup, CPU_ROWS, with_trl=not args.no_trl)
        name = "dpo_vs_trl"
    results["settings"]["command"] = command
    levers.write(results, report(results), out_dir, name)
    failed = [f"{r['row']} ({r['trainer']})" for r in results["runs"] if "error" in r]
    if failed or results["problems"]:
        raise SystemExit(f"FAILED: {', '.join(failed)}; mismatches: {results['problems']}")


if __name__ == "__main__":
    main()
