"""recipes/sft.py against TRL's SFTTrainer on one CUDA GPU: a ~1B LLaMA, bf16 mixed precision, < 10 minutes on an H100.

    # here (CPU, PyPI reachable): the wheels the GPU image lacks (datasets & co., trl) into .gpu_carry/wheels
    .venv-bench/bin/python benchmarks/gpu_sft.py --prepare
    # on the GPU machine (torch, transformers, accelerate, peft installed), with .gpu_carry/ carried along:
    python benchmarks/gpu_sft.py                   # table on stdout, results in benchmarks/results/gpu_sft.*
    # here, the whole logic end to end on CPU with a tiny model and a few steps (no GPU needed):
    .venv-bench/bin/python benchmarks/gpu_sft.py --tiny

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, 128,256-token vocabulary,
tied embeddings: 1.24B parameters) with random weights, written once as a bf16 checkpoint that every run loads (same
initial weights in every run, checked). The chats are the demo's (recipes/demo: character tokenizer), made into
multi-turn chats of up to ~900 tokens; loss on assistant tokens only; max length 1024; micro-batch 8 x accumulation
2; one epoch of --steps x 16 chats (packed runs: the same chats in rows of 1024 tokens, 16 rows per step); AdamW,
cosine schedule, clipping at 1.0; bf16 autocast over fp32 weights.

Rows: full fine-tuning and LoRA (r 16, all linear layers), each unpacked (length-grouped batches in both) and packed
(both best-fit decreasing); the recipe with its chunked loss (default) and, unpacked and packed, without it
(train.chunked_loss=false: full logits); TRL 1.x (its own fused, chunked LM-head loss, always on). Each run is a fresh
process. Throughput is measured the same way in both (see benchmarks/sft_vs_trl.py: a forward hook counts the
non-padding tokens and stamps the step starts after a CUDA synchronize): `steady` tokens/s excludes the first 3
steps (CUDA/cuBLAS warm-up), `whole` covers all of training. Memory: torch.cuda.max_memory_allocated and
max_memory_reserved at the end of training. A run that fails or runs past its time is a FAIL row, and the script
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_vs_trl as bench  # noqa: E402  (benchmarks/ is not a package)

REPO = bench.REPO
CARRY = REPO / ".gpu_carry"  # git-ignored; shared with benchmarks/gpu_check.py, whose --prepare empties it
# What the GPU image lacks for this script (it has torch, transformers, accelerate, peft, pyarrow, pandas).
WHEELS = ["datasets", "dill", "multiprocess", "xxhash", "trl"]
MODULES = ["datasets", "dill", "multiprocess", "xxhash", "trl", "pyarrow", "pandas", "peft", "psutil"]

GPU = {
    "model": {"vocab": 128256, "hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192},
    "max_length": 1024, "micro": 8, "accumulation": 2, "steps": 30, "excluded": 3, "scale": 4, "max_turns": 8,
    "timeout": 150, "budget": 560, "eval_batch_size": 2,
}  # fmt: skip
TINY = {
    "model": {"vocab": 4096, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256},
    "max_length": 256, "micro": 2, "accumulation": 2, "steps": 5, "excluded": 1, "scale": 1, "max_turns": 5,
    "timeout": 600, "budget": 3600, "eval_batch_size": 2,
}  # fmt: skip
LR = {"full": 1e-4, "lora": 2e-4}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
SEED, WARMUP, VALIDATION_CHATS = 42, 3, 8
# (tuning, packing, trainer, recipe chunked loss)
ROWS = [
    (tuning, packing, trainer, chunked)
    for tuning in ("full", "lora")
    for packing in (False, True)
    for trainer, chunked in (("recipe", True), ("recipe", False), ("trl", None))
]


def prepare() -> None:
    """Wheels of the versions installed here (what the CPU benchmark ran) for the GPU machine, added to
    .gpu_carry/wheels (benchmarks/gpu_check.py installs the same folder)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    wheels = CARRY / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *pins], check=True)
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(f"{wheels}: {', '.join(pins)}; {CARRY} holds {size:.0f} MiB: carry it with the run (.gpu_carry)")


def install_carried() -> None:
    """Install .gpu_carry/wheels and this repo (no dependencies), then fail loudly if anything is missing."""
    from gpu_check import install_carried as install

    install()
    missing = []
    for module in MODULES:
        found = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if found.returncode:
            missing.append(f"{module} ({found.stderr.strip().splitlines()[-1] if found.stderr.strip() else '?'})")
    if missing:
        raise SystemExit(
            f"cannot run: {', '.join(missing)}. Run `python benchmarks/gpu_sft.py --prepare` on a machine with PyPI "
            "and carry .gpu_carry/ along (pyarrow and pandas must be on the GPU image, or add their wheels there)."
        )


def make_model(path: Path, sizes: dict, max_length: int, device: str) -> None:
    """A LLaMA of `sizes` with random weights (seed SEED), saved in bf16 with the demo tokenizer (in a subprocess:
    the driver keeps no CUDA context)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    bench.write_model_dir(path, sizes, max_positions=max(max_length, 1024))
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(path)


def row_name(tuning: str, packing: bool, trainer: str, chunked: bool | None) -> str:
    loss = "" if trainer == "trl" else (" chunked" if chunked else " plain loss")
    return f"{tuning} {'packed' if packing else 'unpacked'} {trainer}{loss}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="here: download the wheels the GPU image lacks")
    parser.add_argument("--tiny", action="store_true", help="dry run on CPU: tiny model, a few steps, fp32")
    parser.add_argument("--steps", type=int, help="optimizer steps of the unpacked runs (default 30; --tiny 5)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --tiny: a tmp dir)")
    parser.add_argument("--make-model", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prepare:
        return prepare()
    settings = dict(TINY if args.tiny else GPU)
    if args.make_model:
        path, device = args.make_model
        return make_model(Path(path), settings["model"], settings["max_length"], device)
    start = time.perf_counter()
    import torch

    if args.tiny:
        device, precision = "cpu", "fp32"  # bf16 autocast on CPU is a different code path, and slow
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run this on the GPU machine, or use --tiny for a CPU dry run")
        install_carried()
        device, precision = "cuda", "bf16"
    settings["steps"] = args.steps or settings["steps"]
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_sft_")) if args.tiny else REPO / "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_SFT_DIR", tempfile.mkdtemp(prefix="gpu_sft_work_")))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    model_dir = work / "model"
    made = subprocess.run([sys.executable, __file__, *(["--tiny"] if args.tiny else []), "--make-model",
                           str(model_dir), device], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    if made.returncode:
        raise SystemExit(f"could not build the model:\n{(made.stdout + made.stderr)[-3000:]}")
    micro, accumulation = settings["micro"], settings["accumulation"]
    chats = settings["steps"] * micro * accumulation
    singles = bench.demo_chats("train")
    train = bench.write_jsonl(
        work / "train.jsonl", bench.multi_turn_chats(singles, chats, settings["max_turns"], SEED, settings["scale"])
    )
    validation = bench.write_jsonl(
        work / "validation.jsonl",
        bench.multi_turn_chats(bench.demo_chats("validation"), VALIDATION_CHATS, settings["max_turns"], SEED + 1,
                               settings["scale"]),
    )  # fmt: skip
    print(f"model and data ready in {time.perf_counter() - start:.0f} s ({work})", flush=True)

    rows = []
    for tuning, packing, trainer, chunked in ROWS:
        name = row_name(tuning, packing, trainer, chunked)
        left = settings["budget"] - (time.perf_counter() - start)
        if left < 30:
            rows.append({"name": name, "status": "FAIL", "error": "not run: the 10-minute budget is spent"})
            print(f"{name}: NOT RUN (time budget)", flush=True)
            continue
        spec = {
            "name": name.replace(" ", "-"), "model": str(model_dir), "random_init": False, "train": str(train),
            "validation": str(validation), "excluded": settings["excluded"], "micro": micro,
            "accumulation": accumulation, "lr": LR[tuning], "warmup": WARMUP, "scheduler": "cosine", "seed": SEED,
            "max_length": settings["max_length"], "precision": precision, "device": device, "packing": packing,
            "grouped": not packing, "chunked_loss": bool(chunked), "lora": LORA if tuning == "lora" else None,
            "eval_batch_size": settings["eval_batch_size"], "out": str(work / name.replace(" ", "-")),
            "timeout": min(settings["timeout"], left), "cleanup": True,
        }  # fmt: skip
        try:
            r = (bench.run_recipe if trainer == "recipe" else bench.run_trl)(spec)
            rows.append({"name": name, "tuning": tuning, "packing": packing, "trainer": trainer, "status": "ok", **r})
            print(f"{name}: {r['steady_tokens_per_s']:.0f} tokens/s steady, peak allocated "
                  f"{r.get('cuda_allocated_mb', 0) / 1024:.1f} GiB, {r['steps']} steps, wall {r['wall_s']:.0f} s",
                  flush=True)  # fmt: skip
        except bench.RunFailed as err:
            rows.append({"name": name, "status": "FAIL", "error": str(err)})
            print(f"{name}: FAIL\n{err}", flush=True)
    total, head = bench.parameter_count(settings["model"])
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "?"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (--tiny dry run)"
    results = {
        "settings": {
            **{k: v for k, v in settings.items() if k not in ("timeout", "budget")},
            "parameters": total,
            "output_layer_parameters": head,
            "precision": precision,
            "lora": LORA,
            "lr": LR,
            "device": gpu,
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}",
            "date": time.strftime("%Y-%m-%d"),
            "total_s": round(time.perf_counter() - start),
        },
        "rows": rows,
    }
    name = "gpu_sft_tiny" if args.tiny else "gpu_sft"
    text = report(results)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    print(f"written to {out_dir}; {results['settings']['total_s']} s in all")
    shutil.rmtree(work, ignore_errors=True)
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"FAILED: {', '.join(failed)}")


def report(results: dict) -> str:
    s = results["settings"]
    m = s["model"]
    lines = [
        f"{s['device']}; {s['versions']}; {s['date']}. LLaMA {m['layers']} layers x {m['hidden']} hidden, "
        f"{m['heads']}/{m['kv_heads']} heads, vocabulary {m['vocab']:,} ({s['parameters'] / 1e6:,.1f}M parameters), "
        f"random weights; max length {s['max_length']}, micro-batch {s['micro']} x accumulation "
        f"{s['accumulation']}, {s['steps']} unpacked steps (1 epoch), {s['precision']}; steady = after "
        f"{s['excluded']} warm-up steps.",
        "",
        "| run | steps | tokens/s steady | tokens/s whole | vs TRL (steady) | CUDA allocated peak GiB "
        "| CUDA reserved peak GiB | peak RSS GiB | padding | last loss | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    trl = {(r["tuning"], r["packing"]): r for r in results["rows"] if r["status"] == "ok" and r["trainer"] == "trl"}
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | | | | | | | | | | FAIL: {r['error'].splitlines()[0][:120]} |")
            continue
        base = trl.get((r["tuning"], r["packing"]))
        ratio = f"{r['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f}x" if base else "-"
        allocated, reserved = (
            f"{r[k] / 1024:.1f}" if k in r else "-" for k in ("cuda_allocated_mb", "cuda_reserved_mb")
        )
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['steady_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {ratio} | "
            f"{allocated} | {reserved} | {r['peak_rss_mb'] / 1024:.1f} | {r['padding_share']:.1%} | "
            f"{r['losses'][-1]:.4f} | ok |"
        )
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    if ok:
        lines += ["", "Checks:"]
        checksums = {r["init_checksum"] for r in ok}
        lines.append(f"- same initial weights in every run: {len(checksums) == 1}")
        for (tuning, packing), t in trl.items():
            w = t["window_check"]
            lines.append(
                f"- {tuning} {'packed' if packing else 'unpacked'}: TRL passes num_items_in_batch "
                f"{t['passes_num_items_in_batch']}; one window after training (fp32, no autocast): TRL loss "
                f"{w['trl']:.6f}, recipe plain {w['recipe_plain']:.6f}, chunked {w['recipe_chunked']:.6f}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
