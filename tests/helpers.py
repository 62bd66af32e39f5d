"""Builders the tests share: toy data, tiny models, recipe arguments, running a recipe in-process or through
`accelerate launch`, and comparing what runs wrote. Fixtures built from these are in tests/conftest.py.

`recipe_main` and `launch` refuse to run a recipe from a test under tests/unit: the unit tier stays fast, and a
recipe run put there by mistake fails at once instead of slowing every `pytest tests/unit`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = REPO / "recipes" / "classify.py"
SFT = REPO / "recipes" / "sft.py"
DPO = REPO / "recipes" / "dpo.py"

# --------------------------------------------------------------------------------------------
# The tiers
# --------------------------------------------------------------------------------------------

# pytest's id of the running test ("tests/unit/test_x.py::test_y (call)"), relative to the repo root.
UNIT_TIER = re.compile(r"(^|/)tests/unit/")


def refuse_in_unit_tier(what: str) -> None:
    """Raise if the running test lives under tests/unit: recipe runs belong in tests/recipes (or distributed)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    if UNIT_TIER.search(current.split("::")[0]):
        raise RuntimeError(
            f"{what} in the unit tier ({current}): tests/unit holds no recipe runs; move this test to tests/recipes"
        )


# --------------------------------------------------------------------------------------------
# Toy data
# --------------------------------------------------------------------------------------------

# A toy topic task: each text holds a few words of its class among filler words.
KEYWORDS = {"fruit": ["apple", "pear", "plum"], "vehicle": ["car", "bus", "truck"], "animal": ["dog", "cat", "cow"]}
FILLER = ["the", "a", "is", "red", "big", "old", "new", "one", "very", "on", "my", "and"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def keyword_rows(n: int, seed: int = 0, labels: list[str] | None = None) -> list[dict]:
    """`n` rows {text, label} of the toy task, of varying length, classes in turn."""
    rng = random.Random(seed)
    names = labels or list(KEYWORDS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = rng.choices(KEYWORDS.get(label, ["[UNK]"]), k=rng.randint(2, 6)) + rng.choices(
            FILLER, k=rng.randint(0, 8)
        )
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def chats(n: int, seed: int) -> list[dict]:
    """Reverse a word: prompts of different lengths, so the masked prompt tokens differ per example."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))
        system = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
        user = {"role": "user", "content": f"reverse {word}" + " please" * rng.randint(0, 2)}
        rows.append({"messages": [*system, user, {"role": "assistant", "content": word[::-1]}]})
    return rows


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Reverse-a-word pairs in TRL's explicit chat format: chosen = the reversed word, rejected = a wrong answer (the
    word itself, or reversed with a letter dropped), prompts of different lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.sample(string.ascii_lowercase, rng.randint(3, 7)))
        wrong = word if rng.random() < 0.5 else word[::-1][:-1]
        user = {"role": "user", "content": f"reverse {word}" + " please" * rng.randint(0, 2)}
        rows.append(
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": word[::-1]}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .csv, .tsv, .json (a list), .jsonl or .parquet by the file's suffix."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        raise ValueError(suffix)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def make_tiny_bert(path: Path, max_positions: int = 64) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a word-level tokenizer for the toy task."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = BERT_SPECIALS + FILLER + [w for ws in KEYWORDS.values() for w in ws]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.model_max_length = max_positions
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_config(vocab_size: int, tokenizer=None, **overrides):
    """The tests' tiny LLaMA: 2 layers, hidden 32, 4 heads over 2 key/value heads (grouped-query attention, as
    current LLaMAs), 64 positions, untied output layer. `tokenizer` gives the special token ids; `overrides`
    any other LlamaConfig value (a test's own sizes, tie_word_embeddings, attn_implementation...)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if tokenizer is not None:
        values.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return LlamaConfig(**{**values, **overrides})


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Role header, content, end-of-turn and newline per message; the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per printable character, plus special tokens; encodings start with <s> as Llama's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def stored_dtypes(model_dir: Path) -> set[str]:
    """The dtypes of the tensors in `model_dir`/model.safetensors, as safetensors names them (F32, BF16...)."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}


# --------------------------------------------------------------------------------------------
# Recipe arguments
# --------------------------------------------------------------------------------------------


def toy_args(tiny_bert: Path, toy_data: dict, output_dir: Path, *extra: str) -> list[str]:
    """recipes/classify.py on the toy task: 8 epochs of 15 steps (micro-batch 8 x accumulation 2)."""
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=8",
        "train.micro_batch_size=8",
        "train.gradient_accumulation_steps=2",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "eval.every_n_steps=20",
        "eval.batch_size=8",
        "logging.every_n_steps=5",
        f"output.dir={output_dir}",
        *extra,
    ]


CHECKPOINT_EVERY = 10


def run_args(tiny_bert: Path, toy_data: dict, output_dir: Path, *extra: str) -> list[str]:
    """recipes/classify.py for checkpoint tests: 30 optimizer steps per epoch (240 examples, micro-batch 4 x
    accumulation 2), 5 epochs, a checkpoint every 10 steps, every step logged, dropout on."""
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.train={toy_data['train']}",
        f"data.validation={toy_data['validation']}",
        "data.max_length=32",
        "train.epochs=5",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=2",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "eval.batch_size=8",
        f"checkpoint.every_n_steps={CHECKPOINT_EVERY}",
        "checkpoint.keep_last=2",
        "logging.every_n_steps=1",
        "logging.progress_bar=never",
        f"output.dir={output_dir}",
        *extra,
    ]


def sft_args(tiny_lm: Path, data: dict, output_dir: Path, *extra: str) -> list[str]:
    """recipes/sft.py on the tiny LLaMA (random init) and the reverse-a-word chats: micro-batch 4, no evaluation
    or checkpoint unless asked, 3 generations of 8 tokens when it evaluates."""
    return [
        f"model.name_or_path={tiny_lm}",
        "model.random_init=true",
        f"data.train={data['train']}",
        f"data.validation={data['validation']}",
        "data.max_length=64",
        "train.micro_batch_size=4",
        "train.global_batch_size=null",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        "train.lr_scheduler=linear",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "eval.batch_size=8",
        "eval.num_generations=3",
        "eval.max_new_tokens=8",
        "logging.every_n_steps=1",
        f"output.dir={output_dir}",
        *extra,
    ]


def dpo_args(tiny_lm: Path, data: dict, output_dir: Path, *extra: str) -> list[str]:
    """recipes/dpo.py on the tiny LLaMA (random init) and the reverse-a-word pairs: micro-batch 4, no evaluation or
    checkpoint unless asked, dropout off, 3 generations of 8 tokens when it evaluates."""
    return [
        f"model.name_or_path={tiny_lm}",
        "model.random_init=true",
        f"data.train={data['train']}",
        f"data.validation={data['validation']}",
        "data.max_length=48",
        "data.max_prompt_length=32",
        "lora.enabled=false",
        "train.micro_batch_size=4",
        "train.global_batch_size=null",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.lr_scheduler=linear",
        "eval.every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "eval.batch_size=8",
        "eval.num_generations=3",
        "eval.max_new_tokens=8",
        "logging.every_n_steps=1",
        "logging.trackers=[]",
        f"output.dir={output_dir}",
        *extra,
    ]


def without_chat_template(model_dir: Path, target: Path) -> Path:
    """A copy of `model_dir` whose tokenizer has no chat template."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# Running a recipe in this process
# --------------------------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so the next Accelerator in this process starts afresh (its
    gradient accumulation steps, mixed precision, device), as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def recipe_main(recipe: Path = CLASSIFY):
    """The `main` of a recipe script (recipes/classify.py by default), freshly loaded, Accelerate's state reset:
    `recipe_main()(args)` runs the recipe in this process as `python recipes/classify.py args` would."""
    refuse_in_unit_tier(f"running {recipe.name} in-process")
    reset_accelerate_state()
    spec = importlib.util.spec_from_file_location(f"{recipe.stem}_recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_bad(args: list[str], capsys, recipe: Path = CLASSIFY) -> str:
    """Run the recipe in-process on bad input: it must exit 2 with an `error: ` message and no traceback
    (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(recipe)(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------
# Running a recipe through `accelerate launch`
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    script: Path,
    args: list[str],
    processes: int = 1,
    config_file: Path | None = None,
    launcher_args: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (and its environment) that runs `script` on CPU, as a user would.

    Without `config_file`: one CPU process, or `processes` CPU processes on gloo (`--multi_gpu` with
    ACCELERATE_USE_CPU, the way that starts several). With `config_file` (DeepSpeed): its own settings.
    """
    refuse_in_unit_tier(f"launching {Path(script).name}")
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else "2"}
    launcher = ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    if config_file is not None:
        env["DS_ACCELERATOR"] = "cpu"
        launcher = ["--config_file", str(config_file), "--mixed_precision", "no", *launcher]
    elif processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        launcher = ["--multi_gpu", *launcher]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *launcher_args, str(script), *args]
    return cmd, env


def launch(
    script: Path,
    args: list[str],
    processes: int = 1,
    config_file: Path | None = None,
    launcher_args: tuple[str, ...] = (),
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run `script` through `accelerate launch` (see `launch_command`) to the end; the CompletedProcess."""
    cmd, env = launch_command(script, args, processes, config_file, launcher_args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_to_end(
    args: list[str], processes: int = 1, config_file: Path | None = None, script: Path = CLASSIFY
) -> subprocess.CompletedProcess:
    """`launch` a recipe (classify by default) that must succeed; the CompletedProcess."""
    result = launch(script, args, processes=processes, config_file=config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(
    args: list[str],
    processes: int,
    sig: int,
    after_step: int,
    output_dir: Path,
    config_file: Path | None = None,
    script: Path = CLASSIFY,
) -> tuple[str, int]:
    """Start a recipe (recipes/classify.py by default); once it has logged `after_step` (past a checkpoint, most
    likely inside an accumulation window), send `sig` to the launcher and every process it started, as a scheduler
    would. Returns (stdout, steps logged before the run ended)."""
    import psutil

    cmd, env = launch_command(script, args, processes, config_file)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and any(r.get("step", 0) >= after_step for r in read_jsonl(log))):
        assert proc.poll() is None, f"the run ended before step {after_step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tree = [proc_ := psutil.Process(proc.pid), *proc_.children(recursive=True)]
    for process in tree:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=120)
    stdout = proc.communicate(timeout=120)[0]
    return stdout, max(r["step"] for r in read_jsonl(log))


# --------------------------------------------------------------------------------------------
# What runs wrote
# --------------------------------------------------------------------------------------------


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """final/ of the two runs holds bitwise equal weights."""
    from safetensors.torch import load_file

    a, b = load_file(run_a / "final" / "model.safetensors"), load_file(run_b / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [name for name in a if not (a[name] == b[name]).all()]
    assert not different, f"not bitwise equal: {different[:5]}"


def assert_tensorboard_matches_metrics_log(run_dir: Path) -> None:
    """Every numeric value of the run's metrics.jsonl is in its TensorBoard event files at its step, and nothing
    else is (as TensorBoard reads them: records purged on resume do not count)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected: dict[str, list] = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                expected.setdefault(name, []).append((record["step"], value))
    assert sum(map(len, expected.values())) > 100
    assert logged.keys() == expected.keys()
    for name, points in expected.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        assert [v for _, v in logged[name]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), name


def final_weights(run: Path) -> dict:
    """The tensors of `run`/final/model.safetensors by name."""
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
