"""benchmarks/gpu_throughput.py --smoke: the whole GPU throughput benchmark on CPU, every column of its table filled."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import REPO, keyword_rows, write_rows

SCRIPT = REPO / "benchmarks" / "gpu_throughput.py"
COLUMNS = [
    "plain PyTorch loop",
    "Trainer, random",
    "Trainer, group_by_length",
    "recipe, length-grouped",
    "recipe, random",
    "recipe, length-grouped, compiled",
    "recipe, random, compiled",
]
MEASURED = re.compile(r"([\d,]+\.\d) \((\d+\.\d\d)x\)")  # examples/s (ratio to Trainer's best)


def test_smoke_fills_every_column(tiny_bert, tmp_path):
    """The plain loop and both Trainer columns (one worker process) and the recipe's length-grouped column (through
    `accelerate launch`) on the tests' tiny BERT: each has a positive rate in both tables and an accuracy; the
    recipe's random and compiled columns (the same code with other keys) are marked skipped; the JSON is written."""
    data = tmp_path / "sst2"  # SST-2's layout (sentence, label 0/1) with the toy task's words
    for name, n, seed in (("train.tsv", 256, 1), ("validation.tsv", 32, 2)):
        rows = keyword_rows(n, seed=seed, labels=["fruit", "vehicle"])
        write_rows(data / name, [{"sentence": r["text"], "label": int(r["label"] == "vehicle")} for r in rows])
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--smoke", "--data", data, "--model", tiny_bert, "--out", out]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = (out / "gpu_throughput_smoke.md").read_text()
    assert table in result.stdout
    headers = [line for line in table.splitlines() if line.startswith("| model |")]
    rows = [line for line in table.splitlines() if line.startswith("| tiny BERT")]
    assert len(headers) == len(rows) == 3  # whole epoch, steady, accuracy
    for header, row in zip(headers, rows, strict=True):
        assert [c.strip() for c in header.strip("|").split("|")][1:] == COLUMNS
        cells = dict(zip(COLUMNS, [c.strip() for c in row.strip("|").split("|")][1:], strict=True))
        for column, text in cells.items():
            if column.endswith("compiled") or column == "recipe, random":
                assert text == "skipped (--smoke)"
            elif row is rows[-1]:
                assert 0 <= float(text) <= 1, (column, text)
            else:
                assert (found := MEASURED.fullmatch(text)), (column, text)
                assert float(found.group(1).replace(",", "")) > 0 and float(found.group(2)) > 0

    runs = json.loads((out / "gpu_throughput_smoke.json").read_text())["models"]["tiny BERT, random init (--smoke)"]
    assert runs.keys() == set(COLUMNS)
    for column in COLUMNS[:4]:
        assert runs[column]["status"] == "ok"
        assert runs[column]["samples_per_s"] > 0 and runs[column]["steady_samples_per_s"] > 0
