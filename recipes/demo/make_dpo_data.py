"""Build the DPO demo: a half-trained SFT demo model, and preference pairs made of its own mistakes.

    python recipes/demo/make_dpo_data.py                       # trains the start model (~40 s), writes the pairs
    python recipes/demo/make_dpo_data.py --start runs/my-sft/final   # pairs from another model

1. The start model (`recipes/demo/dpo_start/`): the SFT demo (recipes/configs/sft/demo.yaml) stopped early,
   200 steps at a constant lr, where its exact match on the 300 held-out prompts is ~0.6 (the full demo reaches
   1.0 in 500 steps).
2. Training pairs (`data/dpo_train.jsonl`): the start model answers the first --prompts training prompts greedily;
   each wrong answer becomes a pair: chosen = the correct answer, rejected = the model's own wrong one.
3. Validation pairs (`data/dpo_validation.jsonl`): all 300 held-out prompts, in order (the demo's exact match is
   scored on their greedy answers); rejected = the model's wrong answer, or where it was right a plausible wrong
   one (another instruction's answer).

Each line is {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}: TRL's
explicit-prompt chat format. Deterministic: the same start model writes the same pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
ANSWERS = {"reverse": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w)), "upper": lambda w: w.upper()}
# A plausible wrong answer where the model was right: what another instruction would give.
CONFUSED = {"reverse": "sort", "sort": "reverse", "upper": "reverse"}


def train_start_model(target: Path) -> None:
    """The SFT demo stopped early (200 steps at a constant lr), its final/ copied to `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            *("accelerate", "launch", "--num_processes", "1", "recipes/sft.py"),
            *("--config", "recipes/configs/sft/demo.yaml"),
            *("train.max_steps=200", "train.lr_scheduler=constant", "eval.every_n_steps=null"),
            *("checkpoint.every_n_steps=null", "logging.trackers=[]", f"output.dir={tmp}/run"),
        ]
        subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
        target.mkdir(parents=True, exist_ok=True)
        for name in START_FILES:
            if (Path(tmp) / "run" / "final" / name).is_file():
                shutil.copy2(Path(tmp) / "run" / "final" / name, target / name)


def greedy_answers(model_dir: Path, chats: list[list[dict]], batch_size: int = 100) -> list[str]:
    """The model's greedy answer to each chat's user turn, decoded as the recipes generate (`generate_greedy`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id
    answers = []
    with torch.no_grad():
        for start in range(0, len(chats), batch_size):
            prompts = [
                tokenizer(
                    tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False,
                )["input_ids"]
                for c in chats[start : start + batch_size]
            ]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad
            )
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def pair(user: dict, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", default=None, help="an SFT model dir to take as the start; default: train it")
    p.add_argument("--prompts", type=int, default=4000, help="training prompts the start model answers")
    p.add_argument("--out", default=str(HERE / "data"), help="folder for dpo_train/dpo_validation.jsonl")
    args = p.parse_args(argv)
    start = HERE / "dpo_start"
    if args.start is None:
        train_start_model(start)
    elif Path(args.start).resolve() != start.resolve():
        start.mkdir(exist_ok=True)
        for name in START_FILES:
            if (Path(args.start) / name).is_file():
                shutil.copy2(Path(args.start) / name, start / name)

    train = read_jsonl(HERE / "data" / "train.jsonl")[: args.prompts]
    validation = read_jsonl(HERE / "data" / "validation.jsonl")
    users = [row["messages"][0] for row in [*train, *validation]]
    answers = greedy_answers(start, [[u] for u in users])
    rows = []
    for user, answer in zip(users, answers, strict=True):
        op, word = user["content"].split(": ", 1)
        rows.append((user, op, word, ANSWERS[op](word), answer))
    train_rows, val_rows = rows[: len(train)], rows[len(train) :]
    train_pairs = [pair(user, right, answer) for user, _, _, right, answer in train_rows if answer and answer != right]
    val_pairs, val_right = [], 0
    for user, op, word, right, answer in val_rows:
        val_right += answer == right
        wrong = answer if answer and answer != right else ANSWERS[CONFUSED[op]](word)
        if wrong == right:  # a word whose reverse is sorted: swap its first two letters
            wrong = right[1] + right[0] + right[2:]
        val_pairs.append(pair(user, right, wrong))
    out = Path(args.out)
    write_jsonl(out / "dpo_train.jsonl", train_pairs)
    write_jsonl(out / "dpo_validation.jsonl", val_pairs)
    print(
        f"start model {start}: exact match {val_right / len(val_rows):.3f} on the {len(val_rows)} held-out prompts; "
        f"{len(train_pairs)} training pairs from its wrong answers to {len(train_rows)} training prompts "
        f"({1 - len(train_pairs) / len(train_rows):.3f} right); {len(val_pairs)} validation pairs",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
