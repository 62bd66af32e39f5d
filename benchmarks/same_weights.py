"""Do the recipes still train bitwise the same weights as an earlier commit? (a refactor's acceptance check)

    python benchmarks/same_weights.py                  # against 91c7cbe, the commit before the restructure
    python benchmarks/same_weights.py --base <rev>     # against any commit

Checks out `--base` into a temporary git worktree, runs the same two commands there and here, and compares every
tensor of final/ bit for bit:
- the default BBC classification config, train.max_steps=20;
- the SFT demo config, train.max_steps=50.
Prints a table (tensors compared, differing tensors, largest difference) and exits 1 if any tensor differs.
The runs take about a minute each on a 2-core CPU; they need the `demo` extra installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "classify (BBC default, 20 steps)": ["recipes/classify.py", "train.max_steps=20"],
    "sft (demo, 50 steps)": ["recipes/sft.py", "--config", "recipes/configs/sft/demo.yaml", "train.max_steps=50"],
}


def train(tree: Path, args: list[str], out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's own finetune package, whichever is installed
    command = ["accelerate", "launch", "--num_processes", "1", *args, f"output.dir={out}", "logging.trackers=[]"]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {tree}:\n{result.stderr[-3000:]}")
    return out / "final"


def compare(base: Path, now: Path) -> tuple[int, int, float]:
    """(tensors, differing tensors, largest absolute difference) between two final/ dirs' safetensors."""
    tensors = differing = 0
    largest = 0.0
    for file in sorted(base.glob("*.safetensors")):
        old, new = load_file(file), load_file(now / file.name)
        if old.keys() != new.keys():
            sys.exit(f"{file.name}: the tensor names differ")
        for name in old:
            tensors += 1
            if not torch.equal(old[name], new[name]):
                differing += 1
                largest = max(largest, (old[name].float() - new[name].float()).abs().max().item())
    if tensors == 0:
        sys.exit(f"{base} holds no safetensors")
    return tensors, differing, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="91c7cbe", help="the commit to compare with (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-weights-") as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.base], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            rows = []
            for label, command in RUNS.items():
                base = train(worktree, command, Path(tmp) / "base-run" / label.split()[0])
                now = train(REPO, command, Path(tmp) / "this-run" / label.split()[0])
                rows.append((label, *compare(base, now)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    print(f"final/ weights here against {args.base}:")
    print(f"| {'run':<34} | tensors | differing | largest difference |")
    print(f"|{'-' * 36}|---------|-----------|--------------------|")
    for label, tensors, differing, largest in rows:
        print(f"| {label:<34} | {tensors:>7} | {differing:>9} | {largest:>18.3g} |")
    if any(row[2] for row in rows):
        sys.exit(1)
    print("bitwise the same")


if __name__ == "__main__":
    main()
