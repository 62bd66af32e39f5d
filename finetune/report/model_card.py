"""A Hugging Face model card (README.md) for a finished run's final/ dir: what was trained, on what, how, how well.

The front-matter comes from `huggingface_hub.ModelCardData`, so the Hub reads it as any card; nothing here calls
the Hub. Only Hub ids go in the front-matter (base_model, datasets): local paths are named in the body.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from finetune.core.paths import PACKAGE_PREFIX, looks_like_path

PIPELINES = {"classify": "text-classification", "sft": "text-generation", "dpo": "text-generation"}
NOT_METRICS = {"step", "epoch", "num_examples", "tokens", "num_tokens"}  # results that count, not score
HUB_METRICS = {"pearson": "pearsonr", "spearman": "spearmanr"}  # our name -> the Hub's metric id
AVERAGES = ("_micro", "_macro", "_weighted")  # f1_macro is the Hub's `f1` with config `macro`
MEMORY_KINDS = {"cuda_allocated": "GPU memory allocated by tensors", "cpu_rss": "resident memory (RSS)"}
DISTRIBUTED = {"MULTI_GPU": "DDP", "MULTI_CPU": "DDP", "DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}


@dataclass
class CardFacts:
    """What the card states about a run, gathered by the recipe at its end."""

    recipe: str  # "classify", "sft" or "dpo"
    config: dict  # the resolved config as a nested dict (finetune.core.config.config_to_dict(cfg))
    results: dict  # the final eval metrics (names without eval_ prefix) and run stats, as eval_results.json
    metric_for_best: str
    train_examples: int
    validation_examples: int
    effective_batch: int  # examples (or packed rows) per optimizer step over all processes
    optimizer_steps: int
    epochs: float
    precision: str  # e.g. "bf16 mixed precision, fp32 weights"
    hardware: str  # from describe_hardware()
    wall_time_s: float
    command: str  # the command that reproduces the run
    label_names: list[str] | None = None  # classification
    stopped_early: dict | None = None  # e.g. {"step": 40, "best_step": 20, "reason": "..."}


def describe_hardware(accelerator) -> str:
    """The devices of the run, e.g. '1 x NVIDIA H100 80GB HBM3 (CUDA 12.8), 1 process, torch 2.8.0' or
    'CPU: AMD EPYC 7B13 (2 cores), 2 processes, DDP, torch 2.8.0'."""
    n, device = accelerator.num_processes, accelerator.device
    if device.type == "cuda":
        backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        # One device per process; other machines' devices are not visible without a collective.
        parts = [f"{n} x {torch.cuda.get_device_name(device)} ({backend})"]
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        parts = [f"CPU: {_cpu_name()} ({cores} cores)"]
    else:
        parts = [f"{n} x {device.type}"]
    parts.append(f"{n} process{'es' if n != 1 else ''}")
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    parts += [DISTRIBUTED.get(kind, kind)] if kind != "NO" else []
    return ", ".join([*parts, f"torch {torch.__version__}"])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _is_local(spec: str) -> bool:
    return spec.startswith(PACKAGE_PREFIX) or looks_like_path(spec) or Path(spec).expanduser().exists()


def is_hub_id(spec: str | None) -> bool:
    """A spec naming a Hub repo: a valid repo id that is neither `package:` nor an existing or path-shaped path."""
    if not spec or _is_local(spec):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return default if node is None else node


def _fmt(value: Any) -> str:
    """A measured number: floats to 4 significant digits (whole from 10,000 on), ints with thousands separators."""
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) >= 1e4:
            return f"{value:,.0f}" if math.isfinite(value) else str(value)
        return f"{value:#.4g}".rstrip(".")
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _num(value: Any) -> str:
    """A configured number, as short as written (3e-05, 0.01, 4)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_duration(seconds: float) -> str:
    """e.g. `42.3 s`, `4 min 12 s`, `2 h 03 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def eval_metrics(results: dict) -> dict[str, float]:
    """The scores among the results: numbers that are not counts, positions or training stats."""
    return {
        name: value
        for name, value in results.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        if name not in NOT_METRICS and not name.startswith("train_")
    }


def hub_metric(name: str) -> tuple[str, str | None]:
    """Our metric name -> (the Hub's metric id, its config), e.g. f1_macro -> (f1, macro)."""
    average = next((suffix for suffix in AVERAGES if name.endswith(suffix)), None)
    return (name.removesuffix(average), average[1:]) if average else (HUB_METRICS.get(name, name), None)


def card_data(facts: CardFacts) -> ModelCardData:
    """The front-matter: Hub ids, task, metrics, tags, and a model-index when the scores are on a Hub dataset."""
    cfg, pipeline_tag = facts.config, PIPELINES.get(facts.recipe, "text-classification")
    model, train, validation = (_get(cfg, key) for key in ("model.name_or_path", "data.train", "data.validation"))
    metrics = eval_metrics(facts.results)
    tags = ["finetune", facts.recipe, *(["lora"] if _get(cfg, "lora.enabled") else [])]
    tags += ["regression"] if _get(cfg, "data.task") == "regression" else []
    eval_results = None
    if is_hub_id(train) and metrics and not (validation and _is_local(validation)):
        # A validation split of the Hub dataset, or a share of its train split held out.
        split = {"dataset_split": validation} if validation else {"dataset_split": _get(cfg, "data.train_split")}
        split |= {} if validation else {"dataset_args": {"held_out_fraction": _get(cfg, "data.validation_fraction")}}
        dataset = {"dataset_type": train, "dataset_name": train, "dataset_config": _get(cfg, "data.hub_config")}
        eval_results = [
            EvalResult(pipeline_tag, **dataset, **split, metric_type=hub_metric(name)[0], metric_value=value,
                       metric_name=name, metric_config=hub_metric(name)[1])
            for name, value in metrics.items()
        ]  # fmt: skip
    return ModelCardData(
        base_model=model if is_hub_id(model) and not _get(cfg, "model.random_init") else None,
        datasets=[train] if is_hub_id(train) else None,
        library_name="transformers",  # final/ is a transformers model, LoRA merged in
        license=_get(cfg, "model.license") or _get(cfg, "license"),  # no config key has one today
        metrics=list(dict.fromkeys(hub_metric(name)[0] for name in metrics)) or None,
        pipeline_tag=pipeline_tag,
        tags=tags,
        model_name=_run_name(cfg) if eval_results else None,
        eval_results=eval_results,
    )


def _run_name(cfg: dict) -> str:
    return Path(_get(cfg, "output.dir", "model")).name or "model"


def _link(spec: str | None, kind: str = "") -> str:
    return f"[`{spec}`](https://huggingface.co/{kind}{spec})" if is_hub_id(spec) else f"`{spec}` (local)"


def _body(facts: CardFacts) -> list[str]:
    cfg, res = facts.config, facts.results
    sft = facts.recipe in ("sft", "dpo")  # causal LMs: they generate
    model, train = _get(cfg, "model.name_or_path"), _get(cfg, "data.train")
    subset = f" ({_get(cfg, 'data.hub_config')})" if _get(cfg, "data.hub_config") else ""
    tasks = {"sft": "supervised fine-tuning of a causal LM", "dpo": _preference_task(cfg)}
    task = tasks.get(facts.recipe, f"text {_get(cfg, 'data.task', 'classification')}")
    base = f"random weights with the architecture of {_link(model)}" if _get(cfg, "model.random_init") else _link(model)
    intro = f"Fine-tuned from {base} on {_link(train, 'datasets/')}{subset} by the finetune `{facts.recipe}` recipe"
    lines = [f"# {_run_name(cfg)}", "", f"{intro} ({task}).", "", "## Evaluation results", ""]
    warnings = res.get("warnings") or []
    lines += [
        *(f"> **WARNING:** {' '.join(str(warning).split())}" for warning in warnings),
        *([""] if warnings else []),
    ]
    lines += ["| Metric | Value |", "|---|---|"]
    for name, value in eval_metrics(res).items():
        lines.append(f"| {name}{' (metric_for_best)' if name == facts.metric_for_best else ''} | {_fmt(value)} |")
    where = f"at step {_fmt(res['step'])}, " if "step" in res else ""
    epochs = _num(round(float(facts.epochs), 4))
    lines += ["", f"On {facts.validation_examples:,} validation examples, {where}after {epochs} epochs.", ""]
    sections = {"Training data": _data(facts), "Training procedure": _procedure(facts)}
    for title, items in {**sections, "Hardware and time": _hardware(facts)}.items():
        lines += [f"## {title}", "", *(f"- {item}" for item in items), ""]
    run_dir = _get(cfg, "output.dir", "<run dir>")
    lines += ["## Reproduce", "", "```bash", facts.command, "```", ""]
    lines += [f"The run dir `{run_dir}` holds the resolved config as `config.yaml` (also below).", "", "## Use", ""]
    final = Path(run_dir) / "final"
    if sft:
        prompt = '"Once upon a time"' if _get(cfg, "data.format") == "text" else '[{"role": "user", "content": "Hi!"}]'
        use = [f'generator = pipeline("text-generation", model="{final}")']
        use += [f'print(generator({prompt}, max_new_tokens=64)[0]["generated_text"])']
    else:
        use = [f'classifier = pipeline("text-classification", model="{final}")', 'print(classifier("Some text"))']
    lines += ["```python", "from transformers import pipeline", "", *use, "```", ""]
    config_yaml = yaml.safe_dump(cfg, sort_keys=False).rstrip()
    return [*lines, "<details><summary>Resolved config</summary>", "", "```yaml", config_yaml, "```", "", "</details>"]


def _preference_task(cfg: dict) -> str:
    """What a DPO run optimised: its loss, beta and reference."""
    loss = {"sigmoid": "DPO", "ipo": "IPO"}.get(_get(cfg, "dpo.loss"), _get(cfg, "dpo.loss"))
    extra = f", label smoothing {_num(_get(cfg, 'dpo.label_smoothing'))}" if _get(cfg, "dpo.label_smoothing") else ""
    extra += f", NLL weight {_num(_get(cfg, 'dpo.sft_weight'))} (RPO)" if _get(cfg, "dpo.sft_weight") else ""
    return f"preference tuning of a causal LM: {loss}, beta {_num(_get(cfg, 'dpo.beta'))}{extra}"


def _data(facts: CardFacts) -> list[str]:
    cfg, res = facts.config, facts.results
    train, validation = _get(cfg, "data.train"), _get(cfg, "data.validation")
    described = (f" ({res[key]})" if isinstance(res.get(key), str) else "" for key in ("train_data", "validation_data"))
    train_stats, validation_stats = described  # the SFT recipe's descriptions of kept/dropped examples
    split = f", split `{_get(cfg, 'data.train_split')}`" if is_hub_id(train) else ""
    lines = [f"Train: {_link(train, 'datasets/')}{split}: {facts.train_examples:,} examples{train_stats}"]
    if not validation:
        fraction, seed = _get(cfg, "data.validation_fraction", 0), _get(cfg, "data.split_seed")
        source = f"{fraction:.0%} of the training data held out (seed {seed})"
    else:
        source = f"split `{validation}`" if is_hub_id(train) and not _is_local(validation) else _link(validation)
    lines += [f"Validation: {source}: {facts.validation_examples:,} examples{validation_stats}"]
    labels = facts.label_names or _get(cfg, "data.label_names")
    lines += [f"Labels: {', '.join(f'`{label}`' for label in labels)}"] if labels else []
    if facts.recipe == "sft":
        loss_on = "every token" if _get(cfg, "data.train_on_prompt") else "completion/assistant tokens only"
        packed = ", packed" if _get(cfg, "data.packing") else ""
        lines += [f"Format `{_get(cfg, 'data.format')}`{packed}; loss on {loss_on}"]
    return [*lines, f"At most {_num(_get(cfg, 'data.max_length'))} tokens per example"]


def _procedure(facts: CardFacts) -> list[str]:
    cfg, batch = facts.config, facts.effective_batch
    train, lora = _get(cfg, "train", {}), _get(cfg, "lora", {})
    micro, accumulation = train.get("micro_batch_size"), train.get("gradient_accumulation_steps") or 1
    global_batch = train.get("global_batch_size")
    if isinstance(micro, int) and micro > 0 and global_batch is None and batch % (micro * accumulation) == 0:
        n = batch // (micro * accumulation)
        geometry = f" = micro-batch {micro} x accumulation {accumulation} x {n} process{'es' if n != 1 else ''}"
    else:  # the accumulation (and with `auto` the micro-batch) followed from global_batch_size at run time
        geometry = f" (train.micro_batch_size={micro}, train.global_batch_size={global_batch})"
    lines = [f"Effective batch {batch}{' packed rows' if _get(cfg, 'data.packing') else ''}{geometry}"]
    lines += [f"{facts.optimizer_steps:,} optimizer steps, {_num(round(float(facts.epochs), 4))} epochs"]
    warmup = train.get("warmup_steps") or 0
    warmup = f"{warmup:.0%} of the steps" if 0 < warmup < 1 else f"{int(warmup)} steps"
    norm = train.get("max_grad_norm")
    clip = f"gradient norm clipped to {_num(norm)}" if norm else "no gradient clipping"
    lines += [
        f"{train.get('optimizer', 'adamw')}, lr {_num(train.get('lr'))}, {train.get('lr_scheduler')} schedule, "
        f"warmup {warmup}, weight decay {_num(train.get('weight_decay'))}, {clip}"
    ]
    patience, delta = train.get("early_stopping_patience"), train.get("early_stopping_min_delta")
    if patience:
        min_delta = f", min delta {_num(delta)}" if delta else ""
        lines += [f"Early stopping on {facts.metric_for_best}: patience {patience} evaluations{min_delta}"]
    checkpointing = ", gradient checkpointing" if train.get("gradient_checkpointing") else ""
    lines += [f"Precision: {facts.precision}{checkpointing}", f"Seed {train.get('seed')}"]
    if lora.get("enabled"):
        targets = ", ".join(lora.get("target_modules") or [])
        lines += [
            f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout {_num(lora.get('dropout'))}, "
            f"targets {targets}; merged into the weights of final/"
        ]
    if facts.stopped_early:  # finetune.training.loop.EarlyStopping.record
        stop = facts.stopped_early
        metric, best = stop.get("metric", facts.metric_for_best), stop.get("best_value")
        value = f" ({metric} {_fmt(best)})" if isinstance(best, (int, float)) else ""
        lines += [
            f"Stopped early after step {stop.get('step', '?')}: {metric} did not improve in "
            f"{stop.get('patience', '?')} evaluations; final/ holds the best model, of step "
            f"{stop.get('best_step', '?')}{value}"
        ]
    return lines


def _hardware(facts: CardFacts) -> list[str]:
    res = facts.results
    lines = [facts.hardware, f"Wall time {format_duration(facts.wall_time_s)}"]
    if isinstance(res.get("train_runtime_s"), (int, float)):
        rates = (("train_samples_per_s", "examples"), ("train_tokens_per_s", "tokens"))
        speed = ", ".join(f"{_fmt(res[key])} {unit}/s" for key, unit in rates if key in res)
        lines += [f"Training {format_duration(res['train_runtime_s'])} without evaluation{': ' * bool(speed)}{speed}"]
    memory = res.get("memory_mb")
    if isinstance(memory, dict) and isinstance(memory.get("peak"), (int, float)):
        kind = MEMORY_KINDS.get(memory.get("kind"), memory.get("kind") or "memory")
        lines += [f"Peak {kind}: {memory['peak']:,.0f} MiB (main process)"]
    return lines


def model_card(facts: CardFacts) -> str:
    """The card text: YAML front-matter + markdown body."""
    body = "\n".join(_body(facts))
    return str(ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{body}\n"))


def write_model_card(target_dir: Path, facts: CardFacts) -> Path:
    """Write <target_dir>/README.md (atomically: temp file then os.replace) and return its path."""
    path = Path(target_dir) / "README.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model_card(facts), encoding="utf-8")
    os.replace(tmp, path)
    return path
