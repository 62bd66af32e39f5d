"""Benchmark: milliseconds per optimizer step of the library's training step against a plain PyTorch loop,
on a model too small for arithmetic to matter (so what is left is per-step overhead). Target: <= 1.1x.

    .venv/bin/python benchmarks/step_overhead.py                   # CPU, and CUDA too when one is visible (~90 s)
    .venv/bin/python benchmarks/step_overhead.py --repeats 5 --variants 8x1
    .venv/bin/python benchmarks/step_overhead.py --profile --steps 200   # where the library's extra time goes

Both loops train the same tiny random BertForSequenceClassification (2 layers, hidden 64, 2 heads,
intermediate 128, vocab 1000, 2 labels) on the same precomputed random token
batches (fixed length 32, an attention mask with random padding), fed by a DataLoader over a list, with the same
fused AdamW and linear schedule (`finetune.core.optim.build_optimizer` / `build_scheduler`) and clipping at 1.0:

- plain: model(**batch) -> cross-entropy (sum / count), backward, clip_grad_norm_, optimizer.step(),
  scheduler.step(), zero_grad(); with accumulation, every micro-batch's summed loss / the window's count.
- library: the classify recipe's loop (recipes/classify.py): `finetune.training.launch.make_accelerator`,
  `accelerator.prepare`, `training_windows` with `count_label_terms`, `TrainStep`, `StopSignals`, `Progress`,
  `train_step.log_record()` every 10 steps, the cadence checks and `train_step.paused()` block (no evaluation
  or checkpoint falls due). Not included: RunLog's file/console output and progress bar (I/O, not the step).

Variants (--variants): micro-batch 8 x accumulation 1, and 4 x 2 (the same 8 examples per optimizer step).

Timing: each repeat is a fresh worker process per device (an Accelerator's device is fixed per process). In it,
both loops train one shared model and optimizer (so that where the allocator put the weights cannot favour
either), each with its own DataLoader and LR schedule; after --warmup steps each they advance alternately in
blocks of --block steps (the order swaps every block, and which loop is built first alternates between
repeats), --steps timed steps each, so that the varying load of a shared machine falls on both alike: two
identical plain loops measure within ~1.5% of each other so on a busy 2-core machine (with blocks of 10 steps
and a model each, within ~5-9%). Reported: medians over all blocks of ms/step, in wall-clock and in process
CPU time, their ratio library / plain, the ratio of the means and the median ratio of neighbouring blocks.

Torch threads: `make_accelerator` sets `train.cpu_threads or cpu_threads_per_process()` (usable cores /
LOCAL_WORLD_SIZE: all cores for one process); this script passes --threads (default 1: per-step overhead is
single-threaded Python, and one thread is what a shared 2-core machine measures steadily) as
`train.cpu_threads` and sets the same number for the plain loop. Results go to
benchmarks/results/step_overhead.{md,json} (--out to change; --profile only prints).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET = 1.1
SEQ_LEN, VOCAB, SEED, LR, WEIGHT_DECAY = 32, 1000, 0, 5e-5, 0.01
EXAMPLES_PER_STEP = 8
WINDOWS_PER_EPOCH = 100  # a few epoch boundaries per run: both loops pay for starting an epoch
LOG_EVERY = 10


# ---------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------


def tiny_bert():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
    )
    torch.manual_seed(SEED)
    return BertForSequenceClassification(config)


def random_batches(count: int, micro: int) -> list[dict]:
    """`count` micro-batches of random tokens, padded to SEQ_LEN with an attention mask (CPU tensors)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(count):
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (micro,), generator=g)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, VOCAB, (micro, SEQ_LEN), generator=g) * mask
        labels = torch.randint(0, 2, (micro,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def only_item(items: list):
    """collate_fn of a DataLoader over precomputed batches (batch_size=1): the batch itself."""
    return items[0]


def loader_over(batches: list[dict]):
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=1, shuffle=False, collate_fn=only_item)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The two loops, written as generators that yield after every optimizer step (so that they can be interleaved)
# ---------------------------------------------------------------------------------------------


def plain_steps(model, optimizer, batches: list[dict], accumulation: int, device, total: int, out: dict):
    """The plain loop: `total` optimizer steps; `out["loss"]` is the last window's mean loss."""
    import torch
    import torch.nn.functional as F

    from finetune.core.optim import build_scheduler

    scheduler = build_scheduler(optimizer, "linear", total)
    loader = loader_over(batches)
    model.train()
    step = 0
    while step < total:
        iterator = iter(loader)
        while step < total:
            window = [b for _, b in zip(range(accumulation), iterator, strict=False)]
            if not window:
                break
            window = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in window]
            count = sum(len(b["labels"]) for b in window)
            window_loss = 0.0
            for batch in window:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits, batch["labels"], reduction="sum") / count
                loss.backward()
                window_loss = window_loss + loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            out["loss"] = window_loss
            yield


def library_steps(accelerator, model, optimizer, batches: list[dict], accumulation: int, total: int, out: dict):
    """The classify recipe's training loop (recipes/classify.py), minus RunLog's output and progress bar;
    `out["records"]` collects what it would log."""
    from finetune.classify.model import classification_loss
    from finetune.core.optim import build_scheduler
    from finetune.core.schemas import CheckpointConfig
    from finetune.training.accumulation import count_label_terms
    from finetune.training.loop import EarlyStopping, checkpoint_due, every
    from finetune.training.progress import Progress
    from finetune.training.step import StopSignals, TrainStep, training_windows

    accelerator.gradient_accumulation_steps = accumulation
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loader = accelerator.prepare(loader_over(batches))
    scheduler = accelerator.prepare(build_scheduler(optimizer, "linear", total))
    progress = Progress(
        num_processes=accelerator.num_processes,
        micro_batch_size=len(batches[0]["labels"]),
        accumulation_steps=accumulation,
        batches_per_epoch=len(train_loader),
    )
    checkpoint = CheckpointConfig()  # no periodic checkpoint, as the recipe's default
    early_stopping = EarlyStopping(None, 0.0, "accuracy")
    records = out.setdefault("records", [])
    model.train()
    with StopSignals() as signals:
        train_step = TrainStep(
            accelerator, model, optimizer, scheduler, classification_loss, signals, 1.0, "stop", None, print
        )
        for window in training_windows(accelerator, train_loader, progress, total, count_label_terms, SEED):
            report = train_step(window, progress)
            if every(LOG_EVERY, progress.step) or progress.step == total:
                records.append({"epoch": progress.epochs, **train_step.log_record()})
            if progress.step == total:
                yield
                break
            checkpoint_now = checkpoint_due(checkpoint, progress)
            with train_step.paused("evaluation"):
                metrics = None  # no evaluation falls due (eval.every_n_steps unset)
            verdict = early_stopping.update(progress, metrics)
            if checkpoint_now or report.stop or verdict.new_best:
                raise RuntimeError("no checkpoint may fall due in this benchmark")
            if report.stop or verdict.stop:
                raise RuntimeError("the benchmark was asked to stop")
            yield


def shared_model(base_model, device):
    """The model and fused AdamW both loops train, in turn: the same tensors in the same memory, so that where
    the allocator happened to put one loop's weights and optimizer state cannot favour it (two identical loops
    on two copies of the model differ by up to ~5% in one process on this machine)."""
    from finetune.core.optim import build_optimizer

    model = copy.deepcopy(base_model).to(device)
    return model, build_optimizer(model, LR, WEIGHT_DECAY)  # decay on weight matrices only, as the recipes


def make_bench_accelerator(threads: int):
    from finetune.core.schemas import TrainConfig
    from finetune.training.launch import make_accelerator

    accelerator, _ = make_accelerator(TrainConfig(micro_batch_size=8, cpu_threads=threads), trackers=[])
    return accelerator


def timed_blocks(loops: dict, device, warmup: int, steps: int, block: int) -> dict[str, dict[str, list[float]]]:
    """Advance the loops `warmup` steps each, then `steps` more in blocks of `block` steps, alternating between
    the loops (the order swaps every block): per loop, ms per step of every block in wall-clock time ("wall")
    and in this process's CPU time ("cpu": what other work on a shared machine does not inflate)."""
    for gen in loops.values():
        for _ in range(warmup):
            next(gen)
    times = {name: {"wall": [], "cpu": []} for name in loops}
    names = list(loops)
    for b in range(steps // block):
        for name in names if b % 2 == 0 else names[::-1]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(block):
                next(loops[name])
            synchronize(device)
            times[name]["cpu"].append(1000 * (time.process_time() - cpu) / block)
            times[name]["wall"].append(1000 * (time.perf_counter() - wall) / block)
    for gen in loops.values():
        for _ in gen:  # run to the end (nothing left when steps is a multiple of block)
            pass
    return times


# ---------------------------------------------------------------------------------------------
# Worker: one device, every variant
# ---------------------------------------------------------------------------------------------


def worker(args) -> dict:
    """One repeat on this process's device: every variant, the two loops interleaved block by block (which loop
    is built and warmed up first alternates with the repeat's parity)."""
    import torch

    import finetune

    accelerator = make_bench_accelerator(args.threads)
    device = accelerator.device
    base = tiny_bert()
    total = args.warmup + args.steps
    runs: dict = {}
    for micro, accumulation in parse_variants(args.variants):
        batches = random_batches(WINDOWS_PER_EPOCH * accumulation, micro)
        torch.set_num_threads(args.threads)  # as make_accelerator does, for both loops
        accelerator.free_memory()  # forget the previous variant's prepared objects (and collect garbage)
        plain_out: dict = {}
        library_out: dict = {}
        model, optimizer = shared_model(base, device)
        loops = {
            "plain": plain_steps(model, optimizer, batches, accumulation, device, total, plain_out),
            "library": library_steps(accelerator, model, optimizer, batches, accumulation, total, library_out),
        }
        if args.repeat % 2:
            loops = dict(reversed(loops.items()))
        blocks = timed_blocks(loops, device, args.warmup, args.steps, args.block)
        runs[f"{micro}x{accumulation}"] = {
            **blocks,
            "plain_last_window_loss": float(plain_out["loss"]),
            "library_last_interval_loss": library_out["records"][-1]["loss"],
        }
        plain, library = (statistics.median(blocks[name]["wall"]) for name in ("plain", "library"))
        print(
            f"  {device.type} {micro}x{accumulation} repeat {args.repeat + 1}: plain {plain:.3f}, library "
            f"{library:.3f} ms/step (wall-clock medians)",
            file=sys.stderr,
        )
    return {
        "finetune": str(Path(finetune.__file__).parent),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_variants(text: str) -> list[tuple[int, int]]:
    """ "8x1,4x2" -> [(8, 1), (4, 2)]: (micro-batch, accumulation steps)."""
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]


def combine(repeats: list[dict]) -> dict:
    """One device's repeats (worker results) -> per variant and clock: the summary over all their blocks, and
    the ratio within each repeat (each its own process: its own memory layout, a few % either way)."""
    first = repeats[0]
    runs = {}
    for variant in first["runs"]:
        entry: dict = {}
        for clock in ("wall", "cpu"):
            plain = [x for r in repeats for x in r["runs"][variant]["plain"][clock]]
            library = [x for r in repeats for x in r["runs"][variant]["library"][clock]]
            entry[clock] = summarise(plain, library) | {
                "ratio_per_repeat": [
                    round(
                        statistics.median(r["runs"][variant]["library"][clock])
                        / statistics.median(r["runs"][variant]["plain"][clock]),
                        4,
                    )
                    for r in repeats
                ]
            }
        entry["last_losses"] = [
            (r["runs"][variant]["plain_last_window_loss"], r["runs"][variant]["library_last_interval_loss"])
            for r in repeats
        ]
        runs[variant] = entry
    return {key: first[key] for key in ("finetune", "device", "device_name", "torch_threads")} | {"runs": runs}


def summarise(plain_ms: list[float], library_ms: list[float]) -> dict:
    """Medians over the timed blocks, the ratio of the medians (the figure held to the target), the ratio of the
    means (every block, slow ones included) and the median ratio of neighbouring blocks."""
    plain, library = statistics.median(plain_ms), statistics.median(library_ms)
    paired = [lib / pl for pl, lib in zip(plain_ms, library_ms, strict=True)]
    return {
        "plain_ms": plain,
        "library_ms": library,
        "ratio": library / plain,
        "met": library / plain <= TARGET,
        "overhead_ms": library - plain,
        "ratio_of_means": statistics.fmean(library_ms) / statistics.fmean(plain_ms),
        "median_paired_ratio": statistics.median(paired),
        "blocks": len(plain_ms),
        "plain_block_ms": [round(x, 4) for x in plain_ms],
        "library_block_ms": [round(x, 4) for x in library_ms],
    }


# ---------------------------------------------------------------------------------------------
# Profile: cProfile of each loop, garbage collections, and the cost of each of the library's pieces on its own
# ---------------------------------------------------------------------------------------------


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(min(n // 10, 100)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - start) / n


def component_costs(accelerator, base_model) -> dict[str, float]:
    """Microseconds per call of each piece the library adds to a step (micro-batch 8, accumulation 1)."""
    import random

    import accelerate.optimizer
    import numpy as np
    import torch
    from accelerate.utils import send_to_device, set_seed

    from finetune.core.optim import build_optimizer
    from finetune.training.accumulation import LossMeter, Window, count_label_terms, windows
    from finetune.training.progress import Progress, seed_window
    from finetune.training.step import StopSignals, window_counts
    from finetune.training.tracking import Throughput

    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = 1
    device = accelerator.device
    batches = random_batches(64, 8)
    batch = send_to_device(batches[0], device)
    model = copy.deepcopy(base_model)
    raw_optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
    model, optimizer = accelerator.prepare(model, raw_optimizer)
    loss = torch.tensor(1.0, device=device)
    window = Window(batches=[batch], num_loss_terms=8, _scale=1 / 8)
    signals, meter, throughput = StopSignals(), LossMeter(), Throughput()
    finite = torch.isfinite(loss)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    raw_loader, shard_loader = loader_over(batches), accelerator.prepare(loader_over(batches))

    def accumulate_empty():
        with accelerator.accumulate(model):
            pass

    def one_window():  # the windows() generator's work for one window, minus the DataLoader
        next(windows(accelerator, [batches[0]], count_label_terms))

    def per_batch(loader):
        def epoch():
            for _ in loader:
                pass

        return lambda: epoch()

    def host_seeds(value=1234):  # the same CPU-side RNG states as set_seed, without the CUDA/XPU/MTIA lazy seeding
        random.seed(value)
        np.random.seed(value)
        torch.default_generator.manual_seed(value)

    raw_zero_grad = raw_optimizer.zero_grad
    costs = {
        "seed_window (accelerate set_seed)": per_call_us(lambda: seed_window(SEED, 7), 500),
        "  np.random.SeedSequence([seed, step]).generate_state(1)": per_call_us(
            lambda: np.random.SeedSequence([SEED, 7]).generate_state(1)
        ),
        "  accelerate set_seed(s)": per_call_us(lambda: set_seed(1234), 500),
        "    random.seed": per_call_us(lambda: random.seed(1234)),
        "    np.random.seed": per_call_us(lambda: np.random.seed(1234)),
        "    torch.manual_seed (every device; lazy CUDA/XPU/MTIA seeding formats a traceback each)": per_call_us(
            lambda: torch.manual_seed(1234), 500
        ),
        "    torch.default_generator.manual_seed": per_call_us(lambda: torch.default_generator.manual_seed(1234)),
        "  random + numpy + torch.default_generator seeds (the CPU-only equivalent)": per_call_us(host_seeds),
        "windows(): send_to_device + count + stack/sum + reduce + .item()": per_call_us(one_window),
        "  send_to_device(batch)": per_call_us(lambda: send_to_device(batches[0], device)),
        "  accelerator.reduce(count) + .item()": per_call_us(
            lambda: int(accelerator.reduce(torch.tensor(8, device=device), reduction="sum").item())
        ),
        "StopSignals.exchange (stack, .cpu().tolist())": per_call_us(lambda: signals.exchange(accelerator, finite)),
        "torch.isfinite(summed_loss)": per_call_us(lambda: torch.isfinite(loss)),
        "window_counts (mask sums, stack)": per_call_us(lambda: window_counts(window, 1)),
        "LossMeter.add": per_call_us(lambda: meter.add(loss, window)),
        "Throughput.add": per_call_us(lambda: throughput.add(8, loss)),
        "Progress.advance": per_call_us(lambda: Progress(batches_per_epoch=10**9).advance(window)),
        "accelerator.accumulate(model) enter/exit": per_call_us(accumulate_empty),
        "AcceleratedOptimizer.zero_grad (inspect.signature each call)": per_call_us(lambda: optimizer.zero_grad()),
        "  the wrapped optimizer's zero_grad": per_call_us(lambda: raw_zero_grad()),
        "AcceleratedOptimizer.step: its 2 is_lomo_available() calls (importlib, uncached)": 2
        * per_call_us(accelerate.optimizer.is_lomo_available, 500),
        "accelerator.clip_grad_norm_": per_call_us(lambda: accelerator.clip_grad_norm_(params, 1.0), 500),
        "  torch.nn.utils.clip_grad_norm_": per_call_us(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), 500),
        "DataLoader, per batch: plain DataLoader": per_call_us(per_batch(raw_loader), 50) / len(batches),
        "DataLoader, per batch: prepared (DataLoaderShard)": per_call_us(per_batch(shard_loader), 50) / len(batches),
    }
    accelerator.free_memory()
    return costs


def gc_counter():
    """A gc callback and the dict it fills: collections and milliseconds per generation."""
    import gc

    counts: dict[int, list[float]] = {}
    started: dict[int, float] = {}

    def callback(phase: str, info: dict) -> None:
        generation = info["generation"]
        if phase == "start":
            started[generation] = time.perf_counter()
        else:
            entry = counts.setdefault(generation, [0, 0.0])
            entry[0] += 1
            entry[1] += 1000 * (time.perf_counter() - started.pop(generation, time.perf_counter()))

    gc.callbacks.append(callback)
    return counts, lambda: gc.callbacks.remove(callback)


def profile(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    accelerator = make_bench_accelerator(args.threads)
    device = accelerator.device
    base = tiny_bert()
    micro, accumulation = parse_variants(args.variants)[0]
    batches = random_batches(WINDOWS_PER_EPOCH * accumulation, micro)
    total = args.warmup + args.steps
    for name in ("plain", "library"):
        accelerator.free_memory()
        out: dict = {}
        model, optimizer = shared_model(base, device)
        if name == "plain":
            gen = plain_steps(model, optimizer, batches, accumulation, device, total, out)
        else:
            gen = library_steps(accelerator, model, optimizer, batches, accumulation, total, out)
        for _ in range(args.warmup):
            next(gen)
        counts, stop_counting = gc_counter()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in gen:
            pass
        profiler.disable()
        stop_counting()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        print(f"\n## cProfile, {name} loop, {micro}x{accumulation}, {args.steps} steps (cumulative, top 40)")
        print(text.getvalue())
        print(f"garbage collections (generation: count, ms): {counts}")
    print(f"\n## Per-call cost of the library's pieces on {device.type}, {args.threads} thread(s) (microseconds)\n")
    print("| piece | us/call |\n| --- | ---: |")
    for name, us in component_costs(accelerator, base).items():
        print(f"| {name} | {us:.1f} |")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run_worker(device: str, repeat: int, args) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the Accelerator then picks the CPU
    command = [sys.executable, __file__, "--worker", f"--repeat={repeat}", *forwarded(args)]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


SETTINGS = ("repeats", "steps", "warmup", "block", "threads", "variants")


def forwarded(args) -> list[str]:
    return [f"--{name}={getattr(args, name)}" for name in SETTINGS]


def markdown(results: list[dict], args, command: str) -> str:
    import accelerate
    import torch
    import transformers

    lines = [
        "# Training-step overhead: library vs plain PyTorch loop",
        "",
        f"`{command}`",
        "",
        f"Measured {date.today().isoformat()}: torch {torch.__version__}, accelerate {accelerate.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} usable CPU cores; finetune from {results[0]['finetune']}.",
        f"Tiny random BERT (2 layers, hidden 64, vocab {VOCAB}), {EXAMPLES_PER_STEP} examples per optimizer step, "
        f"sequence length {SEQ_LEN}. {args.repeats} repeats, each a fresh process per device: both loops training "
        f"one shared model and optimizer, {args.warmup} warm-up steps each, then {args.steps} timed steps each in "
        f"blocks of {args.block}, the loops alternating block by block. ms/step: median over all blocks.",
        "",
        "| device | threads | micro x accumulation | clock | ms/step plain | ms/step library | ratio | target "
        "| met? | ratio of means | median paired ratio | ratio per repeat |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for result in results:
        for name, run in result["runs"].items():
            for clock in ("wall", "cpu"):
                r = run[clock]
                per_repeat = ", ".join(f"{x:.3f}" for x in r["ratio_per_repeat"])
                lines.append(
                    f"| {result['device']} | {result['torch_threads']} | {name} | {clock} | {r['plain_ms']:.3f} | "
                    f"{r['library_ms']:.3f} | {r['ratio']:.3f}x | <= {TARGET}x | {'yes' if r['met'] else '**no**'} "
                    f"| {r['ratio_of_means']:.3f}x | {r['median_paired_ratio']:.3f}x | {per_repeat} |"
                )
    lines += [
        "",
        "wall: wall-clock time; cpu: this process's CPU time over the same blocks (with 1 torch thread, the step's "
        "work without the time other processes took the core; on CUDA, wall is the figure). ratio: library / "
        "plain of the medians; median paired ratio: of each block against its neighbour of the other loop; "
        "ratio per repeat: within each worker process.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="worker processes per device (medians over all)")
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per loop per repeat")
    parser.add_argument("--warmup", type=int, default=20, help="untimed optimizer steps first")
    parser.add_argument("--block", type=int, default=2, help="steps per timed block (the loops alternate)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops (train.cpu_threads)")
    parser.add_argument("--variants", default="8x1,4x2", help="micro-batch x accumulation steps, comma-separated")
    parser.add_argument("--profile", action="store_true", help="profile the loops instead (prints only)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where step_overhead.{md,json} go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.profile:
        profile(args)
        return
    command = shlex.join(["python", "benchmarks/step_overhead.py", *argv])
    repeats: dict[str, list[dict]] = {device: [] for device in devices()}
    for repeat in range(args.repeats):  # devices alternate too
        for device in repeats:
            repeats[device].append(run_worker(device, repeat, args))
    results = [combine(runs) for runs in repeats.values()]
    md = markdown(results, args, command)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_overhead.md").write_text(md)
    settings = {name: getattr(args, name) for name in SETTINGS}
    payload = {"command": command, "target": TARGET, "settings": settings, "results": results}
    (args.out / "step_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
