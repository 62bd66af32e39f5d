"""Two machines on one box: `accelerate_configs/multi_node.yaml` launched twice, `--machine_rank 0` and
`--machine_rank 1`, one CPU process each, talking over 127.0.0.1 (gloo). Kill -9 both after a checkpoint,
resume both: the weights end bitwise equal to an uninterrupted single-machine run of 2 processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
from helpers import CLASSIFY, REPO, assert_same_weights, free_port, launch_command, read_jsonl, run_args, run_to_end

from finetune.training.checkpoints.layout import PROGRESS_FILE, list_checkpoints

MULTI_NODE = REPO / "accelerate_configs" / "multi_node.yaml"
# 240 examples / (micro-batch 4 x accumulation 2 x 2 processes) = 15 optimizer steps; checkpoints at 5 and 10.
# cpu_threads=1: the recipe's default divides the cores by the processes on *this machine* (LOCAL_WORLD_SIZE),
# 1 per "machine" here but 2 in the single-machine reference, and a different thread count changes the
# rounding of the matrix products.
SETTINGS = ["train.epochs=1", "checkpoint.every_n_steps=5", "train.cpu_threads=1"]


def machine_command(script: Path, args: list[str], rank: int, port: int) -> tuple[list[str], dict[str, str]]:
    """What a user runs on machine `rank` (of 2): the shipped config, with the values of this box on top."""
    cmd, env = launch_command(
        script,
        args,
        processes=2,  # all processes on all machines
        config_file=MULTI_NODE,  # adds --mixed_precision no (the file says bf16, for GPUs)
        # command-line values win over the file's; this --main_process_port replaces launch_command's own
        launcher_args=("--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)),
    )
    env["ACCELERATE_USE_CPU"] = "true"  # the file's distributed_type MULTI_GPU then runs on gloo
    return cmd, env


@contextlib.contextmanager
def two_machines(script: Path, args: list[str], logs: Path):
    """Start both machines; yield their launcher processes; kill whatever is left of them on the way out."""
    port = free_port()
    procs = []
    try:
        for rank in (0, 1):
            cmd, env = machine_command(script, args, rank, port)
            log = (logs / f"machine{rank}.log").open("w")
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
            log.close()
        yield procs
    finally:
        kill_trees(procs, signal.SIGKILL)


def kill_trees(procs: list[subprocess.Popen], sig: int) -> None:
    """Send `sig` to each launcher and every process it started (collected before any is signalled)."""
    tree = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(proc.pid)
            tree += [parent, *parent.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)
    psutil.wait_procs(tree, timeout=60)
    for proc in procs:
        proc.wait(timeout=60)


def wait_for_both(procs: list[subprocess.Popen], logs: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(procs):
        try:
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = "timeout"
        log = (logs / f"machine{rank}.log").read_text()
        assert returncode == 0, f"machine {rank}: {returncode}\n{log[-3000:]}"


def test_two_machines_killed_after_a_checkpoint_resume_bitwise(tiny_bert, toy_data, tmp_path):
    reference = tmp_path / "reference"
    run_to_end(run_args(tiny_bert, toy_data, reference, *SETTINGS), processes=2)  # one machine, 2 processes

    output_dir = tmp_path / "run"
    args = run_args(tiny_bert, toy_data, output_dir, *SETTINGS)
    metrics = output_dir / "metrics.jsonl"
    (logs := tmp_path / "first").mkdir()
    with two_machines(CLASSIFY, args, logs) as procs:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and any(r.get("step", 0) >= 7 for r in read_jsonl(metrics))):
            assert all(p.poll() is None for p in procs), (logs / "machine0.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kill_trees(procs, signal.SIGKILL)  # both machines at once, mid-window, as a lost allocation would
    assert not (output_dir / "final").exists()
    latest = list_checkpoints(output_dir)[-1]
    assert json.loads((latest / PROGRESS_FILE).read_text())["step"] in (5, 10)
    # Each process wrote its own RNG state; machine 1's lands here because the dir is shared.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (latest / "state").iterdir()}

    (logs := tmp_path / "resumed").mkdir()
    with two_machines(CLASSIFY, [*args, "train.resume_from=latest"], logs) as procs:
        wait_for_both(procs, logs)
    assert f"resumed from {latest}" in (logs / "machine0.log").read_text()
    assert_same_weights(reference, output_dir)


CHECK_SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from finetune.core.errors import UserError
from finetune.core.multinode import check_machines_agree

accelerator = Accelerator()
rank, root = accelerator.process_index, Path(sys.argv[1])
cases = {
    "shared": dict(output_dir=root / "shared", config={"train": {"lr": 0.1}}),
    "own dir": dict(output_dir=root / f"machine{rank}", timeout_s=1),
    "config": dict(output_dir=root / "shared", config={"train": {"lr": 0.1 * (rank + 1)}}),
}
for case, kwargs in cases.items():
    try:
        check_machines_agree(accelerator, **kwargs)
        outcome = "ok"
    except UserError as err:
        outcome = str(err)
    print("CASE", json.dumps([rank, case, outcome]), flush=True)
# as the recipes end: a process leaving gloo while its peer still talks to it can abort the peer (SIGABRT)
accelerator.wait_for_everyone()
accelerator.end_training()
"""


def test_machines_that_do_not_share_the_output_dir_or_the_config_are_refused(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    (logs := tmp_path / "logs").mkdir()
    with two_machines(script, [str(tmp_path)], logs) as procs:
        wait_for_both(procs, logs, timeout=120)
    outcomes = {}
    for rank in (0, 1):
        for line in (logs / f"machine{rank}.log").read_text().splitlines():
            if line.startswith("CASE "):
                seen_by, case, outcome = json.loads(line[5:])
                outcomes[seen_by, case] = outcome
    assert outcomes[0, "shared"] == outcomes[1, "shared"] == "ok"
    for rank in (0, 1):  # every process raises the same error, so none waits for the others forever
        assert "process 1 (host" in outcomes[rank, "own dir"] and "cannot see the file" in outcomes[rank, "own dir"]
        assert "train.lr: 0.1 vs 0.2" in outcomes[rank, "config"]
    assert not list((tmp_path / "shared").glob(".shared-fs-check-*")), "the probe file is removed"
