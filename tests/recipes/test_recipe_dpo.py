"""recipes/dpo.py end to end on a tiny random LLaMA: a LoRA run (reference: adapters off) and its outputs, kill -9
and resume with a precomputed reference, the dry run's memory, bad input refused before the model loads, and the
offline demo reaching its stated exact match. (Exact accumulation over 1 and 2 processes:
tests/distributed/test_exactness.py; the loss and the reference in one process: tests/unit/test_preference_loss.py.)"""

from __future__ import annotations

import json
import signal

import pytest
from helpers import (
    DPO,
    REPO,
    assert_same_weights,
    dpo_args,
    interrupt,
    read_jsonl,
    recipe_main,
    reset_accelerate_state,
    run_bad,
    run_to_end,
    without_chat_template,
    write_rows,
)

from finetune.preference.loss import STATS


@pytest.mark.parametrize(
    "levers", [[], ["model.quantization=nf4", "train.optimizer=adamw_8bit"]], ids=["lora", "qlora"]
)
def test_lora_run_starts_at_its_reference_and_writes_a_generating_model(levers, tiny_lm, pair_data, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["lora.enabled=true", "train.max_steps=6", "eval.every_n_steps=3", "eval.metric_for_best=accuracy", *levers]
    recipe_main(DPO)(dpo_args(tiny_lm, pair_data, out, *args, "train.lr=3e-2"))
    assert "reference: adapter_off" in capsys.readouterr().out
    records = read_jsonl(out / "metrics.jsonl")
    first = next(r for r in records if "loss" in r)
    # LoRA starts as the identity (B = 0): the policy is its reference, every reward 0 and the loss log 2.
    assert first["rewards/margin"] == 0 and first["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert all(name in first for name in STATS)
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [3, 6]
    assert all(f"eval_{name}" in evaluations[0] for name in (*STATS, "exact_match"))
    last = [r for r in records if "loss" in r][-1]
    assert last["rewards/margin"] > 0, "the chosen answers did not gain on the rejected ones"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["reference"] == "adapter_off" and results["metric_for_best"] == "accuracy"
    assert len(read_jsonl(out / "generations" / "step_000006.jsonl")) == 3
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    if levers:  # final/ is merged onto the dequantized base: it gives the quantized model's logits
        assert results["merged_model"]["max_logit_difference"] < 1e-4

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(out / "final"), device="cpu")
    reply = generator([{"role": "user", "content": "reverse abc"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    card = (out / "final" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "preference tuning of a causal LM: DPO, beta 0.1" in card
    reset_accelerate_state()


def test_kill_9_and_resume_with_a_precomputed_reference_equals_an_uninterrupted_run(tiny_lm, pair_data, tmp_path):
    args = ["train.max_steps=10", "checkpoint.every_n_steps=2", "eval.num_generations=0", "train.lr=3e-3"]
    whole = run_to_end(dpo_args(tiny_lm, pair_data, tmp_path / "whole", *args), script=DPO)
    assert "reference: precomputed" in whole.stdout
    out = tmp_path / "killed"
    _, last_logged = interrupt(
        dpo_args(tiny_lm, pair_data, out, *args), 1, signal.SIGKILL, after_step=5, output_dir=out, script=DPO
    )
    assert not (out / "final").exists() and last_logged < 10
    resumed = run_to_end(dpo_args(tiny_lm, pair_data, out, *args, "train.resume_from=latest"), script=DPO)
    assert "resumed from" in resumed.stdout
    assert "reference log-probs: read from" in resumed.stdout  # the same reference, not recomputed from the policy
    assert_same_weights(tmp_path / "whole", out)


def test_dry_run_counts_two_sequences_per_pair_and_a_reference_copy(tiny_lm, pair_data, tmp_path, capsys):
    """And a pair whose chosen is its rejected is dropped and counted, not refused."""
    rows = read_jsonl(pair_data["train"])
    same = {**rows[0], "rejected": rows[0]["chosen"]}
    data = {**pair_data, "train": write_rows(tmp_path / "train.jsonl", [*rows, same])}
    for reference, out in (("precomputed", tmp_path / "a"), ("model", tmp_path / "b")):
        recipe_main(DPO)([*dpo_args(tiny_lm, data, out, f"dpo.reference={reference}"), "--dry-run"])
        stdout = capsys.readouterr().out
        assert "49 pairs: 48 kept" in stdout and "1 dropped with identical completions" in stdout
        assert "micro-batch 4 (2 sequences each)" in stdout
        assert ("reference model" in stdout) == (reference == "model")
        assert not out.exists()
    reset_accelerate_state()


def test_bad_input_is_refused_before_the_model_loads(tiny_lm, pair_data, tmp_path, capsys, monkeypatch):
    import finetune.core.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr(finetune.core.modeling, "load_causal_lm", no_model)
    user = {"role": "user", "content": "reverse ab"}
    answer = [{"role": "assistant", "content": "ba"}]
    bad_rows = {
        "Set data.chosen_column": [{"prompt": [user], "good": answer, "rejected": answer}],
        "row 1 has no prompt column": [
            {"chosen": [user, *answer], "rejected": [{"role": "user", "content": "other"}, *answer]},
        ],
        "row 1: the chosen completion is empty": [
            {"prompt": [user], "chosen": [{"role": "assistant", "content": " "}], "rejected": answer}
        ],
    }
    for i, (expected, rows) in enumerate(bad_rows.items()):
        data = {**pair_data, "train": write_rows(tmp_path / f"bad{i}.jsonl", rows)}
        err = run_bad(dpo_args(tiny_lm, data, tmp_path / f"out{i}"), capsys, DPO)
        assert expected in err, err
    err = run_bad(dpo_args(tiny_lm, pair_data, tmp_path / "x", "dpo.reference=adapter_off"), capsys, DPO)
    assert "dpo.reference=adapter_off needs lora.enabled=true" in err
    no_template = without_chat_template(tiny_lm, tmp_path / "no_template")
    err = run_bad(dpo_args(no_template, pair_data, tmp_path / "y"), capsys, DPO)
    assert "data.chat_template" in err
    assert not any(p.name.startswith("out") or p.name in "xy" for p in tmp_path.iterdir() if p.is_dir())
    reset_accelerate_state()


def test_the_offline_demo_reaches_its_stated_exact_match(tmp_path, capsys):
    """recipes/configs/dpo/demo.yaml as shipped, to its end: the exact match recipes/demo/README.md states."""
    out = tmp_path / "demo"
    recipe_main(DPO)(["--config", str(REPO / "recipes" / "configs" / "dpo" / "demo.yaml"), f"output.dir={out}"])
    assert "done" in capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 100 and results["exact_match"] >= 0.88, results["exact_match"]
    reset_accelerate_state()
