"""Load tokenizers, configs and models from a local dir, an installed package, or the Hub."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune.errors import UserError
from finetune.paths import local_path

# Tokenizers without a real limit report this sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 10**9


def model_source(name_or_path: str) -> str:
    """What to pass to from_pretrained: a local dir (resolving `package:`) or a Hub id as given."""
    path = local_path(name_or_path, "model.name_or_path")
    return str(path) if path is not None else name_or_path


def _load(loader, cfg, what: str, **kwargs):
    source = model_source(cfg.name_or_path)
    try:
        return loader.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model.name_or_path={cfg.name_or_path!r}: could not load the {what}: {first_line}. "
            "Give a local model dir, `package:<pkg>/<dir>`, or a Hub id (the Hub needs network; "
            "offline only cached models load)."
        ) from None


def load_tokenizer(cfg) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg` (a ModelConfig); models without a pad token pad with EOS."""
    tokenizer = _load(AutoTokenizer, cfg, "tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg, **overrides) -> PretrainedConfig:
    """The model's config alone (cheap: no weights), with `overrides` applied."""
    return _load(AutoConfig, cfg, "model config", **overrides)


def max_model_length(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest input the model takes, from its position embeddings or its tokenizer."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)]
    if tokenizer.model_max_length and tokenizer.model_max_length < _NO_LIMIT:
        limits.append(tokenizer.model_max_length)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def check_max_length(max_length: int, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """`data.max_length` above what the model takes is an error, before any weights load."""
    limit = max_model_length(config, tokenizer)
    if limit is not None and max_length > limit:
        raise UserError(
            f"data.max_length={max_length} is above the model's limit of {limit} tokens; set it <= {limit}."
        )


def load_classifier(cfg, label_names: list[str], tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A sequence-classification model with a fresh head for `label_names`, labels saved in its config."""
    id2label = dict(enumerate(label_names))
    model = _load(
        AutoModelForSequenceClassification,
        cfg,
        "model",
        num_labels=len(label_names),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        ignore_mismatched_sizes=True,  # a checkpoint fine-tuned on other labels gets a fresh head
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
