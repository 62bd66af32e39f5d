"""Benchmark: recipes/sft.py against TRL's SFTTrainer on this CPU, same model, data and optimisation.

    # once: TRL in a venv of its own (the project's .venv stays as it is; .venv* is git-ignored)
    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && .venv-bench/bin/pip install -e . trl
    .venv-bench/bin/python benchmarks/sft_vs_trl.py                # results in benchmarks/results/sft_vs_trl.*
    .venv-bench/bin/python benchmarks/sft_vs_trl.py --quick        # smoke run (a few steps, results in a tmp dir)

Both trainers get the same LLaMA-architecture model (built from a config, random weights drawn with the same seed;
the script checks the initial weights are equal), the same chat JSONL, loss on assistant tokens only, max length,
global batch (micro-batch x accumulation), AdamW without weight decay, cosine schedule with warmup, clipping, fp32,
one process, with packing off (both length-grouped batches) and on (both best-fit-decreasing packing). The runs
alternate (recipe, TRL, recipe, TRL, ...), each in a fresh process: the recipe through `accelerate launch`, TRL as a
worker of this script.

Throughput is measured the same way in both: a forward pre-hook on the model's decoder (the same module in both)
counts the non-padding input tokens of every training micro-batch and stamps the wall clock and the process's CPU
time at the first micro-batch of every optimizer step. Each run trains one epoch, so both process exactly the same
tokens (checked). tokens/s = those tokens / training time (the recipe's train_runtime_s; TRL: a callback from
on_train_begin to on_train_end); startup, data preparation and evaluation are outside. tokens/CPU-s = tokens of
steps w+1 .. S-1 / CPU time over them (w warm-up steps left out): on a CPU shared with other work, wall time swings
by 10x and more from one run to the next, CPU time much less. Peak memory is the process's peak resident set size
(ru_maxrss) at the end of training (the recipe's eval_results memory_mb.peak; TRL's on_train_end).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sft.py"
DEMO = REPO / "recipes" / "demo"
SYSTEM_PROMPT = "You transform strings of letters exactly as the user asks."

# The CPU comparison: a LLaMA with LLaMA-2's 32k vocabulary, 14.5M parameters, whose (tied) output layer is ~56% of
# the matmul work per token (vocab / (12 * layers * hidden) = 1.3): logits matter, more than in 1B models (~0.3).
CPU_MODEL = {"vocab": 32000, "hidden": 256, "layers": 8, "heads": 4, "kv_heads": 4, "intermediate": 688}
MAX_LENGTH, MICRO, ACCUMULATION = 256, 4, 2
LR, WARMUP, SCHEDULER, SEED = 1e-3, 5, "cosine", 42
VALIDATION_CHATS, MAX_TURNS = 64, 5
EXCLUDED_STEPS = 2  # warm-up steps left out of the throughput
MODES = {  # name: (packing, length-grouped batches)
    "unpacked": (False, True),  # the recipe's default batching, and Trainer's train_sampling_strategy=group_by_length
    "packed": (True, False),
    "random": (False, False),  # plain shuffled batches (TRL's default sampler); not run unless --modes asks
}
DEFAULT_MODES = "unpacked,packed"


# ---------------------------------------------------------------------------------------------
# Data and model (shared with gpu_sft.py)
# ---------------------------------------------------------------------------------------------


def demo_chats(split: str) -> list[list[dict]]:
    """The demo's single-turn chats (recipes/demo/data/<split>.jsonl), or freshly generated ones if not there."""
    path = DEMO / "data" / f"{split}.jsonl"
    if path.is_file():
        return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    generator = runpy.run_path(str(DEMO / "make_sft_data.py"))
    train, validation = generator["generate"](8000, 300, 0, list(generator["OPS"]), 3, 7, None)
    return [row["messages"] for row in (train if split == "train" else validation)]


def multi_turn_chats(singles: list[list[dict]], n: int, max_turns: int, seed: int, scale: int = 1) -> list[dict]:
    """`n` chats of 1..max_turns user/assistant turns drawn from `singles`, half with a system message.

    `scale` > 1 repeats each user and assistant content `scale` times (longer chats, same structure)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
        for single in rng.choices(singles, k=rng.randint(1, max_turns)):
            messages += [{"role": m["role"], "content": " ".join([m["content"]] * scale)} for m in single]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_model_dir(path: Path, model: dict, max_positions: int, tie: bool = True) -> Path:
    """config.json of a LLaMA with `model`'s sizes and the demo's chat tokenizer (the vocabulary beyond the
    tokenizer's ~100 ids is never an input, but every logit is computed and trained)."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "tiny_llama")
    tokenizer.model_max_length = max_positions
    if model["vocab"] < len(tokenizer):
        raise ValueError(f"vocab {model['vocab']} is below the tokenizer's {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=model["vocab"],
        hidden_size=model["hidden"],
        intermediate_size=model["intermediate"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        num_key_value_heads=model["kv_heads"],
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path, save_jinja_files=False)
    config.save_pretrained(path)
    return path


def parameter_count(model: dict, tie: bool = True) -> tuple[int, int]:
    """(all parameters, output-layer parameters) of a LLaMA with `model`'s sizes."""
    h, v, i, layers = model["hidden"], model["vocab"], model["intermediate"], model["layers"]
    kv = h // model["heads"] * model["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if tie else 2) + layers * per_layer + h, v * h


# ---------------------------------------------------------------------------------------------
# Measuring inside the training process (both trainers)
# ---------------------------------------------------------------------------------------------


class ForwardMeter:
    """Non-padding input tokens of every training forward, and the clock at the first micro-batch of each
    optimizer step (after a CUDA synchronize on a GPU), from a forward pre-hook on the model's decoder."""

    def __init__(self, pad_token_id: int, accumulation: int):
        self.pad, self.k = pad_token_id, accumulation
        self.tokens: list = []  # per forward; device tensors, read at the end
        self.padded: list[int] = []
        self.stamps: list[float] = []  # wall clock
        self.cpu_stamps: list[float] = []  # CPU time of the process (all threads)
        self.on = True

    def attach(self, model) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if not (self.on and module.training and __import__("torch").is_grad_enabled()):
            return
        ids = kwargs.get("input_ids")
        ids = args[0] if ids is None else ids
        if len(self.tokens) % self.k == 0:
            if ids.is_cuda:
                __import__("torch").cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
        self.tokens.append((ids != self.pad).sum())
        self.padded.append(ids.numel())

    def checksum(self, model) -> float:
        import torch

        with torch.no_grad():
            return float(sum(p.sum(dtype=torch.float64) for p in model.parameters()))

    def summary(self, steps: int, excluded: int, train_s: float) -> dict:
        """Tokens per second over the whole training (`train_s`, the trainer's own training time) and in the
        steady state (from the start of step excluded+1 to the start of the last step, its tokens); fails loudly
        unless the forwards make `steps` optimizer steps of `k` micro-batches (the last one may be shorter)."""
        n = len(self.tokens)
        if len(self.stamps) != steps or not (steps - 1) * self.k < n <= steps * self.k:
            raise RuntimeError(
                f"expected {steps} optimizer steps of {self.k} micro-batches, saw {n} training forwards "
                f"({len(self.stamps)} steps)"
            )
        tokens = [int(t) for t in self.tokens]
        excluded = min(excluded, steps - 2)
        first, last = excluded * self.k, (steps - 1) * self.k
        seconds = self.stamps[-1] - self.stamps[excluded]
        cpu_seconds = self.cpu_stamps[-1] - self.cpu_stamps[excluded]
        return {
            "tokens_per_s": sum(tokens) / train_s,
            "steady_tokens_per_s": sum(tokens[first:last]) / seconds,
            "steady_tokens_per_cpu_s": sum(tokens[first:last]) / cpu_seconds,
            "train_s": train_s,
            "tokens": sum(tokens),
            "padded_tokens": sum(self.padded),
            "padding_share": 1 - sum(tokens) / sum(self.padded),
            "forwards": n,
        }


def memory(device: str) -> dict:
    """Peak memory of this process so far: RSS on CPU, CUDA allocated and reserved on a GPU (MiB)."""
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def recipe_worker(stats: Path, accumulation: int, recipe_args: list[str]) -> None:
    """Run recipes/sft.py in this process (under `accelerate launch`), with a ForwardMeter on its model and the
    peak memory read where the recipe reads its own (end of training, before the final evaluation)."""
    import finetune.core.modeling
    import finetune.training.tracking

    record: dict = {}
    original_load, original_memory = finetune.core.modeling.load_causal_lm, finetune.training.tracking.memory_mb
    meter: ForwardMeter | None = None

    def load_causal_lm(cfg, tokenizer, dtype, **quantized):
        nonlocal meter
        model = original_load(cfg, tokenizer, dtype, **quantized)
        meter = ForwardMeter(tokenizer.pad_token_id, accumulation)
        meter.attach(model)
        record["init_checksum"] = meter.checksum(model)
        return model

    def memory_mb(device):
        out = original_memory(device)
        record["memory"] = memory(device.type)  # the last call is the one after training
        return out

    finetune.core.modeling.load_causal_lm, finetune.training.tracking.memory_mb = load_causal_lm, memory_mb
    sys.argv = [str(RECIPE), *recipe_args]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    finally:
        if meter is not None and meter.tokens:
            record["forwards"] = len(meter.tokens)
            record["meter"] = {"tokens": [int(t) for t in meter.tokens], "padded": meter.padded,
                               "stamps": meter.stamps, "cpu_stamps": meter.cpu_stamps}  # fmt: skip
        stats.write_text(json.dumps(record))


def validation_loss(model, tokenizer, path: Path, max_length: int, device) -> float:
    """Mean loss per assistant token over a chat JSONL, as the recipe's evaluation computes it."""
    import torch

    from finetune.core.schemas import SFTDataConfig
    from finetune.lm.collate import SFTCollator
    from finetune.lm.data import load_sft_data
    from finetune.lm.loss import next_token_loss
    from finetune.lm.tokenize import tokenize_sft
    from finetune.training.accumulation import count_next_token_terms

    cfg = SFTDataConfig(train=str(path), validation=str(path), max_length=max_length)
    data = load_sft_data(cfg)
    ds, _ = tokenize_sft(data.validation, tokenizer, cfg)
    collate = SFTCollator.for_tokenizer(tokenizer)
    total, terms = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ds), 8):
            examples = [ds[i] for i in range(start, min(start + 8, len(ds)))]
            batch = {k: v.to(device) for k, v in collate(examples).items()}
            total += float(next_token_loss(model, batch))
            terms += int(count_next_token_terms(batch))
    model.train(was_training)
    return total / terms


def trl_worker(spec: dict) -> dict:
    """One SFTTrainer run (one epoch) as `spec` says; returns what the driver compares."""
    import psutil
    import torch
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.lm.loss import disable_chunked_loss, next_token_loss
    from finetune.lm.probes import enable_exact_chunked_loss
    from finetune.training.accumulation import IGNORE_INDEX

    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the recipe does with one process
    set_seed(spec["seed"])  # the recipe seeds the same way right before it builds the model
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if spec.get("random_init", True):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model"]), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    meter = ForwardMeter(tokenizer.pad_token_id, spec["accumulation"])
    meter.attach(model)
    init_checksum = meter.checksum(model)

    class Clock(TrainerCallback):
        """Training time: on_train_begin (dataloader, optimizer and model prepared) to on_train_end."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before = psutil.Process().memory_info().rss / 2**20
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.memory = memory(device)

    clock = Clock()
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        lora = spec["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(
        output_dir=spec["out"],
        num_train_epochs=1,
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["lr"],
        lr_scheduler_type=spec["scheduler"],
        warmup_steps=spec["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=spec["precision"] == "bf16",
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True, the recipe's False
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
        max_length=spec["max_length"],
        packing=spec["packing"],
        assistant_only_loss=True,
        train_sampling_strategy="group_by_length" if spec["grouped"] else "random",
    )
    train = load_dataset("json", data_files=spec["train"], split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    prepared = trainer.train_dataset
    data_tokens = sum(len(x) for x in prepared["input_ids"])
    data_targets = sum(sum(1 for t in y[1:] if t != IGNORE_INDEX) for y in prepared["labels"])
    trainer.train()
    meter.on = False
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps = trainer.state.global_step

    # The loss normalisation, outside the timed part: one accumulation window of TRL's own batches, its
    # training loss as Trainer computes it (sum over micro-batches of compute_loss(num_items_in_batch)) against
    # the recipe's (summed next-token loss over the window / its target tokens), plain and chunked; in fp32, without
    # autocast (Trainer's is gone after train()).
    loader = iter(trainer.get_train_dataloader())
    window = [{k: v.to(model.device) if torch.is_tensor(v) else v for k, v in next(loader).items()}
              for _ in range(spec["accumulation"])]  # fmt: skip
    n_items = sum((b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in window)
    trainer.model.eval()  # no dropout (LoRA's): the same forward three times
    with torch.no_grad():
        trl_window = sum(float(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=n_items))
                         for b in window)  # fmt: skip
        plain = sum(float(next_token_loss(trainer.model, dict(b))) for b in window) / float(n_items)
        enable_exact_chunked_loss(trainer.model)
        chunked = sum(float(next_token_loss(trainer.model, dict(b))) for b in window) / float(n_items)
        disable_chunked_loss(trainer.model)
    val_loss = validation_loss(trainer.model, tokenizer, Path(spec["validation"]), spec["max_length"], model.device)
    return {
        **meter.summary(steps, spec["excluded"], clock.seconds),
        "steps": steps,
        "losses": losses,
        "validation_loss": val_loss,
        "init_checksum": init_checksum,
        "rss_before_mb": clock.rss_before,
        **clock.memory,
        "data_tokens": data_tokens,
        "data_targets": data_targets,
        "rows": len(prepared),
        "passes_num_items_in_batch": bool(trainer.model_accepts_loss_kwargs),
        "window_check": {"trl": trl_window, "recipe_plain": plain, "recipe_chunked": chunked},
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def launch_command(mixed_precision: str = "no") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]  # fmt: skip


def recipe_args(spec: dict) -> list[str]:
    """The recipe's key=value arguments for `spec` (one epoch)."""
    args = [
        f"model.name_or_path={spec['model']}",
        f"model.random_init={str(spec.get('random_init', True)).lower()}",
        f"data.train={spec['train']}",
        f"data.validation={spec['validation']}",
        f"data.max_length={spec['max_length']}",
        f"data.packing={str(spec['packing']).lower()}",
        f"data.group_by_length={str(spec['grouped']).lower()}",
        "train.epochs=1",
        f"train.micro_batch_size={spec['micro']}",
        f"train.global_batch_size={spec['micro'] * spec['accumulation']}",  # one process: the accumulation
        f"train.lr={spec['lr']}",
        f"train.lr_scheduler={spec['scheduler']}",
        f"train.warmup_steps={spec['warmup']}",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        f"train.seed={spec['seed']}",
        f"train.chunked_loss={str(spec.get('chunked_loss', True)).lower()}",
        "eval.every_n_steps=null",
        "eval.num_generations=0",
        f"eval.batch_size={spec.get('eval_batch_size', 16)}",
        "checkpoint.every_n_steps=null",
        "logging.every_n_steps=1",
        "logging.progress_bar=never",
        f"output.dir={spec['out']}",
    ]
    if spec.get("lora"):
        lora = spec["lora"]
        args += ["lora.enabled=true", f"lora.r={lora['r']}", f"lora.alpha={lora['alpha']}",
                 f"lora.dropout={lora['dropout']}"]  # fmt: skip
    return args


class RunFailed(RuntimeError):
    """A benchmark run exited with an error or ran past its time."""


def _run(cmd: list[str], spec: dict) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=spec.get("timeout"))
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        raise RunFailed(f"{spec['name']}: still running after {spec['timeout']:.0f} s\n{output[-3000:]}") from None
    if result.returncode:
        raise RunFailed(f"{spec['name']} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
    return result


def run_recipe(spec: dict) -> dict:
    """recipes/sft.py under `accelerate launch`, with this script's meter around it (see `recipe_worker`)."""
    out = Path(spec["out"])
    stats = out.parent / f"{out.name}.stats.json"
    mixed = "bf16" if spec["precision"] == "bf16" else "no"
    cmd = [*launch_command(mixed), __file__, "--recipe-worker", str(stats), "--accumulation",
           str(spec["accumulation"]), "--", *recipe_args(spec)]  # fmt: skip
    start, load = time.perf_counter(), load_average()
    _run(cmd, spec)
    r = json.loads((out / "eval_results.json").read_text())
    record = json.loads(stats.read_text())
    meter = ForwardMeter(0, spec["accumulation"])
    names = ("tokens", "padded", "stamps", "cpu_stamps")
    meter.tokens, meter.padded, meter.stamps, meter.cpu_stamps = (record["meter"][k] for k in names)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    numbers = re.search(r"([\d,]+) tokens, ([\d,]+) of them targets", r["train_data"])
    if spec.get("cleanup"):
        shutil.rmtree(out, ignore_errors=True)  # final/ holds the whole model (GBs on the GPU)
    return {
        **meter.summary(r["step"], spec["excluded"], r["train_runtime_s"]),
        "steps": r["step"],
        "losses": [m["loss"] for m in metrics if "loss" in m],
        "validation_loss": r["loss"],
        "init_checksum": record["init_checksum"],
        "own_tokens_per_s": r["train_tokens_per_s"],  # the recipe's count: packed rows with their padding
        "rss_before_mb": r["memory_mb"]["before_training"],
        **record["memory"],
        "data_tokens": int(numbers.group(1).replace(",", "")),
        "data_targets": int(numbers.group(2).replace(",", "")),
        "wall_s": time.perf_counter() - start,
        "load_average": [load, load_average()],
    }


def run_trl(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--trl-worker", json.dumps(spec)]
    start, load = time.perf_counter(), load_average()
    r = json.loads(_run(cmd, spec).stdout.strip().splitlines()[-1])
    if spec.get("cleanup"):
        shutil.rmtree(spec["out"], ignore_errors=True)
    return {**r, "wall_s": time.perf_counter() - start, "load_average": [load, load_average()]}


def check_runs(recipe: dict, trl: dict, name: str) -> list[str]:
    """What does not match between a recipe run and a TRL run of the same settings (empty: all fine)."""
    problems = []
    if recipe["init_checksum"] != trl["init_checksum"]:
        problems.append(f"initial weights differ ({recipe['init_checksum']} vs {trl['init_checksum']})")
    if recipe["tokens"] != trl["tokens"] or recipe["tokens"] != recipe["data_tokens"]:
        problems.append(f"tokens trained on differ: recipe {recipe['tokens']} (data {recipe['data_tokens']}), "
                        f"TRL {trl['tokens']} (data {trl['data_tokens']})")  # fmt: skip
    if recipe["data_targets"] != trl["data_targets"]:
        problems.append(f"assistant target tokens differ: {recipe['data_targets']} vs {trl['data_targets']}")
    w = trl["window_check"]
    if abs(w["trl"] - w["recipe_plain"]) > 1e-4 * abs(w["trl"]) or not trl["passes_num_items_in_batch"]:
        problems.append(f"loss normalisation differs on one window: {w}")
    return [f"{name}: {p}" for p in problems]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--recipe-worker":  # under accelerate launch
        stats, rest = Path(sys.argv[2]), sys.argv[3:]
        accumulation = int(rest[1]) if rest[:1] == ["--accumulation"] else 1
        return recipe_worker(stats, accumulation, rest[rest.index("--") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer per mode, interleaved")
    parser.add_argument(
        "--steps", type=int, default=40,
        help="optimizer steps of the unpacked runs: the training set is steps x global batch chats, trained for "
        "one epoch (packed runs train on the same chats in fewer, fuller steps)",
    )  # fmt: skip
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 1 repeat, results in a tmp dir")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --quick: a tmp dir)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.trl_worker:
        print(json.dumps(trl_worker(json.loads(args.trl_worker))))
        return
    if args.quick:
        args.steps, args.repeats = 6, 1
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="sft_vs_trl_")) if args.quick else REPO / "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers
    import trl

    train_chats = args.steps * MICRO * ACCUMULATION
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        tmp = Path(tmp)
        train = write_jsonl(tmp / "train.jsonl", multi_turn_chats(demo_chats("train"), train_chats, MAX_TURNS, SEED))
        validation = write_jsonl(
            tmp / "validation.jsonl", multi_turn_chats(demo_chats("validation"), VALIDATION_CHATS, MAX_TURNS, SEED + 1)
        )
        model_dir = write_model_dir(tmp / "model", CPU_MODEL, max_positions=1024)
        common = {"model": str(model_dir), "train": str(train), "validation": str(validation),
                  "excluded": EXCLUDED_STEPS, "micro": MICRO, "accumulation": ACCUMULATION, "lr": LR,
                  "warmup": WARMUP, "scheduler": SCHEDULER, "seed": SEED, "max_length": MAX_LENGTH,
                  "precision": "fp32", "device": "cpu"}  # fmt: skip
        runs: dict[str, dict[str, list]] = {m: {"recipe": [], "trl": []} for m in modes}
        started = load_average()
        for repeat in range(args.repeats):
            for mode in modes:
                packing, grouped = MODES[mode]
                for trainer, run in (("recipe", run_recipe), ("trl", run_trl)):
                    name = f"{mode}-{trainer}-{repeat}"
                    spec = {**common, "name": name, "packing": packing, "grouped": grouped, "out": str(tmp / name)}
                    r = run(spec)
                    runs[mode][trainer].append(r)
                    print(f"{name}: {r['tokens_per_s']:.0f} tokens/s ({r['steady_tokens_per_s']:.0f} steady), "
                          f"{r['steps']} steps in {r['train_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, last "
                          f"loss {r['losses'][-1]:.4f}, val loss {r['validation_loss']:.4f}, wall {r['wall_s']:.0f} "
                          f"s, load {r['load_average'][0][0]} -> {r['load_average'][1][0]}", flush=True)  # fmt: skip
                problems += check_runs(runs[mode]["recipe"][-1], runs[mode]["trl"][-1], f"{mode} repeat {repeat}")
    total, head = parameter_count(CPU_MODEL)
    results = {
        "settings": {
            "model": {**CPU_MODEL, "parameters": total, "output_layer_parameters": head, "tied_embeddings": True},
            "max_length": MAX_LENGTH,
            "micro_batch": MICRO,
            "accumulation": ACCUMULATION,
            "train_chats": train_chats,
            "epochs": 1,
            "excluded_warmup_steps": EXCLUDED_STEPS,
            "lr": LR,
            "scheduler": f"{SCHEDULER}, {WARMUP} warmup steps",
            "seed": SEED,
            "validation_chats": VALIDATION_CHATS,
            "cpu_threads": len(os.sched_getaffinity(0)),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "load_average": {"start": started, "end": load_average()},
        },
        "runs": runs,
        "problems": problems,
    }
    (out_dir / "sft_vs_trl.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (out_dir / "sft_vs_trl.md").write_text(text)
    print(text)
    print(f"written to {out_dir}")
    if problems:
        raise SystemExit("MISMATCH between the two trainers' runs:\n" + "\n".join(problems))


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict) -> str:
    s = results["settings"]
    m = s["model"]
    loads = sorted(r["load_average"][i][0] for t in results["runs"].values() for rs in t.values() for r in rs
                   for i in (0, 1))  # fmt: skip
    lines = [
        f"LLaMA {m['layers']} layers x {m['hidden']} hidden, vocabulary {m['vocab']:,} ({m['parameters'] / 1e6:.1f}M "
        f"parameters, {m['output_layer_parameters'] / 1e6:.1f}M of them the tied embedding / output layer), random "
        f"init; {s['train_chats']} chats, 1 epoch, max length {s['max_length']}, micro-batch {s['micro_batch']} x "
        f"accumulation {s['accumulation']}, fp32, {s['cpu_threads']} threads; {s['versions']}; {s['date']}; "
        f"1-minute load average {loads[0]}-{loads[-1]} during the runs.",
        "",
        "tokens/s = non-padding input tokens of the epoch / training time (the recipe's train_runtime_s, TRL's "
        "on_train_begin..on_train_end). tokens/CPU-s = the same tokens of steps "
        f"{s['excluded_warmup_steps'] + 1}..last-1 / the process's CPU time (all threads) over them, from the same "
        "forward hook in both: far less sensitive than wall time to other tenants of the machine.",
        "",
        "| mode | trainer | steps | tokens/s (median; each run) | tokens/CPU-s (median; each run) | recipe / TRL "
        "| peak RSS MiB | RSS growth in training MiB | padding | loss, last 5 steps | validation loss |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, by_trainer in results["runs"].items():
        trl = by_trainer["trl"]
        for trainer, runs in by_trainer.items():
            rate, cpu, rss = (_median(runs, k) for k in ("tokens_per_s", "steady_tokens_per_cpu_s", "peak_rss_mb"))
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            each_cpu = ", ".join(f"{r['steady_tokens_per_cpu_s']:.0f}" for r in runs)
            growth = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs)
            final = statistics.fmean(statistics.fmean(r["losses"][-5:]) for r in runs)
            val = statistics.fmean(r["validation_loss"] for r in runs)
            pad = statistics.fmean(r["padding_share"] for r in runs)
            ratio = (f"{rate / _median(trl, 'tokens_per_s'):.2f}x tokens/s, "
                     f"{cpu / _median(trl, 'steady_tokens_per_cpu_s'):.2f}x tokens/CPU-s, "
                     f"{rss / _median(trl, 'peak_rss_mb'):.2f}x RSS" if trainer == "recipe" else "")  # fmt: skip
            lines.append(f"| {mode} | {trainer} | {runs[0]['steps']} | {rate:.0f} ({each}) | {cpu:.0f} ({each_cpu}) | "
                         f"{ratio} | {rss:.0f} | {growth:.0f} | {pad:.1%} | {final:.4f} | {val:.4f} |")  # fmt: skip
    lines += ["", "Recipe / TRL of the runs made back to back, each repeat (median):"]
    for mode, t in results["runs"].items():
        both = list(zip(t["recipe"], t["trl"], strict=False))
        for key, what in (("tokens_per_s", "tokens/s"), ("steady_tokens_per_cpu_s", "tokens/CPU-s")):
            ratios = [a[key] / b[key] for a, b in both]
            each = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"- {mode}, {what}: {each} ({statistics.median(ratios):.2f}x)")
        loads = ", ".join(f"{a['load_average'][0][0]}-{b['load_average'][1][0]}" for a, b in both)
        lines.append(f"- {mode}: 1-minute load average over each pair {loads}")
    lines += ["", "Checks (first repeat):"]
    for mode, t in results["runs"].items():
        rec, tr = t["recipe"][0], t["trl"][0]
        w = tr["window_check"]
        lines.append(
            f"- {mode}: same initial weights: {rec['init_checksum'] == tr['init_checksum']}; tokens trained on "
            f"{rec['tokens']:,} / {tr['tokens']:,} (recipe / TRL), assistant targets {rec['data_targets']:,} / "
            f"{tr['data_targets']:,}; step-1 loss {rec['losses'][0]:.4f} / {tr['losses'][0]:.4f}; TRL passes "
            f"num_items_in_batch: {tr['passes_num_items_in_batch']}; one window of TRL's batches after training: TRL "
            f"loss {w['trl']:.6f}, recipe plain {w['recipe_plain']:.6f}, recipe chunked {w['recipe_chunked']:.6f}"
        )
    if results["problems"]:
        lines += ["", "MISMATCHES:", *(f"- {p}" for p in results["problems"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
