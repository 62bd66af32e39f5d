"""finetune-eval: score an exported model, a training checkpoint, or every model of a run.

    finetune-eval runs/classify                        # every checkpoint and final/, on the run's validation data
    finetune-eval runs/classify/final data.validation=other.csv data.text_column=sentence
    finetune-eval runs/sft                             # a causal LM run: loss and perplexity, leaderboard by loss
    finetune-eval runs/sft/checkpoints/step_000200 data.validation=held_out.jsonl eval.num_generations=50
    finetune-eval runs/sft/final data.validation=qa.jsonl data.format=prompt_completion data.max_length=2048
    finetune-eval runs/dpo                             # a preference run: loss, rewards, accuracy against its reference
    finetune-eval runs/dpo/final data.validation=pairs.jsonl reference.name_or_path=runs/sft/final
    finetune-eval runs/sft/final data.validation=pairs.jsonl reference.name_or_path=recipes/demo/dpo_start
    accelerate launch -m finetune.eval runs/classify      # several processes: each example scored once

The kind of model is read from its config.json (`architectures`: *ForCausalLM is a causal LM, as is a model
type of AutoModelForCausalLM when no architecture is named) or from the run's config.yaml:

- classifiers (recipes/classify.py) by accuracy, F1 (regression: pearson, spearman, mse) and loss;
- causal LMs (recipes/sft.py) by loss per target token and perplexity, summed over every target token once
  (the tokens training puts loss on: data.train_on_prompt and the rest of the run's data keys), and with
  eval.num_generations=N by exact_match of greedy generations for the first N prompts;
- preference models (recipes/dpo.py; or any causal LM given a reference.* or dpo.* key) by the DPO loss, rewards
  (chosen, rejected, margin), accuracy (share of pairs whose chosen reward is higher) and log-probs over every
  pair once, against a reference: reference.name_or_path, by default the model the run started from (so rewards
  are those training reported; a model.random_init run's was never saved: give one); the loss is the run's
  dpo.loss, beta, label_smoothing and sft_weight. A run's leaderboard has the reference's row too: rewards and
  accuracy 0 by definition, its log-probs and exact_match the starting point.

Models are scored in fp32 by the code training evaluates with (finetune.classify.evaluate.predict,
finetune.lm.evaluate.evaluate_lm, finetune.preference.evaluate.preference_metrics): a final/ scores as the run's
eval_results.json reports (up to the rounding of mixed precision, when the run trained under it).

Data keys are the recipe's (`data.*`); without overrides the run's own validation data is used, read from
the run's saved config.yaml (a path given on the command line, such as data.validation, overrides it). Writes,
per model: eval_results.json, and for a classifier predictions.jsonl, per_class.csv and confusion_matrix.png,
for a causal LM generations.jsonl (with eval.num_generations > 0); for a run, a leaderboard (leaderboard.csv /
.json) sorted by `eval.metric_for_best` (a causal LM's default: the run's choice, else loss; lower is better; a
preference model's: the run's choice, else accuracy).
Results go to <given path>/eval (for a run: one sub-dir per model), or output.dir. A model dir may be a full
model (config.json + weights) or a peft adapter (adapter_config.json + adapter_model.safetensors, as a LoRA
run's checkpoints hold), loaded on its base model: the adapter's base_model_name_or_path or the run's
model.name_or_path, or model.name_or_path=... given here. The adapters of a model.random_init run cannot be
scored: their base weights were never saved (its final/ holds the merged model and can be).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import datasets
from transformers.utils import logging as hf_logging

from finetune.classify.score import score_classifiers
from finetune.core.config import describe_type, parse_argv, read_yaml, schema_keys
from finetune.core.errors import exit_on_user_error
from finetune.core.metric_names import MetricGoal
from finetune.core.run_dir import write_json
from finetune.core.saved_models import ADAPTER_CONFIG, ScoredModels, find_models, is_whole_run
from finetune.core.schemas import ScoreConfig, ScoreDPOConfig, ScoreLMConfig
from finetune.lm.score import score_causal_lms
from finetune.preference.score import score_preference_models

# The entry alone: which scorer by the kind of model (finetune.classify.score, finetune.lm.score,
# finetune.preference.score), and the leaderboard.
CAUSAL_LM, CLASSIFIER = "causal_lm", "classifier"


def is_causal_lm_architecture(name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    return name.endswith("ForCausalLM") or name in names


def is_sft_config(saved: dict) -> bool:
    """A run's config.yaml written by recipes/sft.py (its data and train keys are the SFT recipe's)."""
    data, train = saved.get("data") or {}, saved.get("train") or {}
    return "format" in data or "train_on_prompt" in data or "chunked_loss" in train


def is_dpo_config(saved: dict | None) -> bool:
    """A run's config.yaml written by recipes/dpo.py (it has a dpo group)."""
    return isinstance((saved or {}).get("dpo"), dict)


def asks_for_preferences(overrides: list[tuple[str, str]]) -> bool:
    """A model outside a DPO run scored as a preference model: the command line names the reference or the loss."""
    return any(key.startswith(("reference.", "dpo.")) for key, _ in overrides)


def model_kind(path: Path, saved: dict | None) -> str:
    """CAUSAL_LM or CLASSIFIER: by the architectures of the model's config.json, else by the run's config.yaml,
    else by the adapter's peft task type, else by the config's model_type (a model type of AutoModelForCausalLM)."""
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    architectures = config.get("architectures") or []
    if architectures:
        return CAUSAL_LM if any(is_causal_lm_architecture(a) for a in architectures) else CLASSIFIER
    if saved is not None:
        return CAUSAL_LM if is_sft_config(saved) or is_dpo_config(saved) else CLASSIFIER
    if (path / ADAPTER_CONFIG).is_file():
        task_type = json.loads((path / ADAPTER_CONFIG).read_text()).get("task_type")
        if task_type in ("CAUSAL_LM", "SEQ_CLS"):
            return CAUSAL_LM if task_type == "CAUSAL_LM" else CLASSIFIER
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return CAUSAL_LM if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else CLASSIFIER


def leaderboard(rows: list[dict], metric: str) -> list[dict]:
    """Rows sorted best first by `metric` (`MetricGoal`: NaN last, such as the correlation of a model that predicts
    a constant; ties in the given order); the best marked."""
    goal = MetricGoal.of(metric)
    ranked = sorted(rows, key=lambda row: goal.sort_key(goal.value(row)))
    for i, row in enumerate(ranked):
        row["best"] = i == 0
    return ranked


def write_leaderboard(scored: ScoredModels) -> None:
    """leaderboard.json / .csv of a run's models, best first by the scorer's metric, and the table on stdout."""
    base, metric, keys = scored.dir, scored.metric_for_best, scored.columns
    ranked = leaderboard(scored.rows, metric)
    write_json(base / "leaderboard.json", ranked)
    with (base / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)
    print(f"\nleaderboard by {metric} ({base / 'leaderboard.csv'}):")
    print(" | ".join(keys))
    for row in ranked:
        print(
            " | ".join(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys)
            + (" *" if row["best"] else "")
        )


def usage() -> str:
    """--help: the module doc and the keys of each kind of model (data.* keys are the recipe's)."""
    lines = [(__doc__ or "").rstrip(), "", "Keys (key=value) besides the recipe's data.* keys:"]
    for title, schema in (
        ("classifier", ScoreConfig),
        ("causal LM", ScoreLMConfig),
        ("preference model (a DPO run, or reference.* / dpo.* given)", ScoreDPOConfig),
    ):
        lines += ["", f"{title}:"]
        for key in schema_keys(schema).values():
            if key.dotted.startswith("data."):
                continue
            default = "null" if key.default is None else key.default
            lines.append(f"  {key.dotted}  ({describe_type(key.type)}, default: {default})")
            lines.append(f"      {key.help}")
    lines += [
        "",
        "data.*: classifier keys as `accelerate launch recipes/classify.py --help` lists them, causal LM keys as "
        "`accelerate launch recipes/sft.py --help` does, preference keys as `accelerate launch recipes/dpo.py "
        "--help` does.",
    ]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # one bar per model loaded would drown the scores
    path, rest = Path(argv[0]), argv[1:]
    if path.is_symlink():  # checkpoints/best: score (and name) the checkpoint it points to
        path = path.resolve()
    models, run_dir = find_models(path)
    overrides = parse_argv(rest).overrides
    saved = read_yaml(run_dir / "config.yaml") if run_dir is not None else None
    kind = model_kind(models[0].path, saved)
    if kind == CAUSAL_LM and (is_dpo_config(saved) or (saved is None and asks_for_preferences(overrides))):
        scored = score_preference_models(path, models, run_dir, saved, overrides)
    elif kind == CAUSAL_LM:
        scored = score_causal_lms(path, models, run_dir, saved, overrides)
    else:
        scored = score_classifiers(path, models, run_dir, overrides)
    # Rows come back on the main process only; scores of unlabelled data have no metric to rank by.
    if is_whole_run(path, run_dir) and scored.rows and scored.metric_for_best in scored.rows[0]:
        write_leaderboard(scored)


if __name__ == "__main__":
    main()
