"""Generate the SFT demo's data: short instructions on random letter strings, answers checkable by exact match.

    python recipes/demo/make_sft_data.py                                  # writes recipes/demo/data/
    python recipes/demo/make_sft_data.py --out /tmp/d --train 20000 --validation 200 --seed 0

Each line of train.jsonl / validation.jsonl is {"messages": [{"role": "user", "content": "reverse: kdmwq"},
{"role": "assistant", "content": "qwmdk"}]}. The instruction word picks the operation, so the model has to read
the instruction, not only the letters:

    reverse: kdmwq -> qwmdk      sort: kdmwq -> dkmqw      upper: kdmwq -> KDMWQ

The letter strings are drawn at random (no repeated letter within a string, so `sort` has one obvious answer);
a string used in validation never appears in train under any instruction, so validation accuracy measures the
learnt procedure, not memory. Deterministic: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

OPS = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "upper": lambda w: w.upper(),
}


def random_word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.sample(string.ascii_lowercase, rng.randint(min_len, max_len)))


def chat(op: str, word: str, system: str | None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": f"{op}: {word}"},
        {"role": "assistant", "content": OPS[op](word)},
    ]
    return {"messages": messages}


def generate(n_train: int, n_validation: int, seed: int, ops: list[str], min_len: int, max_len: int, system):
    rng = random.Random(seed)
    # validation first, on its own set of strings; train then skips every one of them
    held_out: set[str] = set()
    while len(held_out) < n_validation:
        held_out.add(random_word(rng, min_len, max_len))
    validation_words = sorted(held_out)
    rng.shuffle(validation_words)
    validation = [chat(ops[i % len(ops)], w, system) for i, w in enumerate(validation_words)]  # balanced ops
    train = []
    while len(train) < n_train:
        word = random_word(rng, min_len, max_len)
        if word not in held_out:
            train.append(chat(rng.choice(ops), word, system))
    return train, validation


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "data"), help="folder for train/validation.jsonl")
    p.add_argument("--train", type=int, default=8000, help="training chats")
    p.add_argument("--validation", type=int, default=300, help="held-out chats (strings never seen in train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated instructions, from {', '.join(OPS)}")
    p.add_argument("--min-len", type=int, default=3, help="shortest letter string")
    p.add_argument("--max-len", type=int, default=7, help="longest letter string (at most 26)")
    p.add_argument("--system", default=None, help="optional system message added to every chat")
    args = p.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    if not 1 <= args.min_len <= args.max_len <= 26:
        p.error("need 1 <= --min-len <= --max-len <= 26")
    train, validation = generate(args.train, args.validation, args.seed, ops, args.min_len, args.max_len, args.system)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", validation)
    print(f"wrote {len(train)} train and {len(validation)} validation chats to {out}")


if __name__ == "__main__":
    main()
