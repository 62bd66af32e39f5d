"""Probes: what a model does with packed rows and with its logits, found by running a tiny instance of its class.

Whether the examples packed into a row stay apart, and whether the chunked loss gives a model's loss, depend on
transformers' model and masking code, which changes from release to release. Neither is read from that code:
both are run. `tiny_model` builds the user's model class from its config shrunk to 2 layers and small widths
(random weights, fp32, on the CPU, seeded without touching the caller's random state), and

- `check_packing_supported` packs and collates a few short examples as training does (`pack_examples`,
  `SFTCollator`) and compares each example's logits in the packed rows with its logits run alone;
- `check_chunked_loss_exact` (called by `enable_exact_chunked_loss`) compares the chunked loss with the plain one:
  they differ when the model does something to its logits after the output layer (soft-capping, scaling).

Flash-attention kernels do not run on the CPU, and flex attention compiles for tens of seconds there, so the
packing probe runs transformers' own flash- and flex-attention paths with dense plain-torch kernels in their
place (`reference_flash_kernels`, `reference_flex_kernels`): what transformers decides around the kernel
(which rows it splits into examples by position_ids, which mask function it builds) is what gets probed.

Each verdict is kept for the process per model class, attention implementation and shrunk config. A probe costs
~0.1 s on one CPU thread for a LLaMA-like config (a 2-layer, 3M-parameter instance), ~0.5 s for the slowest
common architectures (torch fallbacks of linear-attention kernels).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from finetune.core.errors import UserError
from finetune.lm.loss import (
    chunk_output_layer,
    disable_chunked_loss,
    enable_chunked_loss,
    find_chunked_head,
    next_token_loss,
    unwrap,
)
from finetune.lm.reference_kernels import reference_flash_kernels, reference_flex_kernels
from finetune.lm.tiny_models import (
    PROBE_SEED,
    config_tree,
    is_count,
    is_flash,
    one_thread,
    special_token_names,
    tiny_config,
    tiny_model,
)
from finetune.training.accumulation import IGNORE_INDEX


def _deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the expected tensor's largest entry."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# Over transformers 5.25's causal LMs (default configs shrunk): packed examples kept apart differ from alone by
# <4e-6 of the logits (fp32 rounding), examples that see each other by >1e-3; an exact chunked loss differs by
# <3e-7, one that skips a change to the logits by >0.5.
PROBE_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# Running a probe
# --------------------------------------------------------------------------------------------


def _tiny_configs(config) -> list:
    """The configs to try a probe on: widths shrunk, then widths kept (each only if transformers accepts it)."""
    configs = []
    for widths in (True, False):
        try:
            configs.append(tiny_config(config, widths))
        except Exception:  # noqa: BLE001  (a config class that validates the shrunk sizes and refuses them)
            continue
    return configs


def _probe_key(model_class: type[nn.Module], config, *more) -> tuple:
    """What a verdict depends on: the class, the attention implementation and the shrunk config."""
    tiny = _tiny_configs(config)
    text = (tiny[0] if tiny else config).to_json_string(use_diff=False)
    return (model_class, _attn_implementation(config), text, *more)


CANNOT_CHECK = "cannot check it"


def _run_on_tiny(model_class: type[nn.Module], config, probe: Callable[[nn.Module], str | None]) -> str | None:
    """`probe`'s verdict on the first tiny instance of `model_class` that builds and runs, or why none did."""
    implementation = _attn_implementation(config) or ""
    if is_flash(implementation):
        kernels = reference_flash_kernels()
    elif "flex_attention" in implementation:
        kernels = reference_flex_kernels()
    else:
        kernels = contextlib.nullcontext()
    failures = []
    with one_thread(), kernels:
        for tiny in _tiny_configs(config):
            try:
                model = tiny_model(model_class, tiny)
            except Exception as err:  # noqa: BLE001  (any failure means: cannot check)
                failures.append(f"a small random {model_class.__name__} could not be built ({_first_line(err)})")
                continue
            try:
                return probe(model)
            except Exception as err:  # noqa: BLE001
                failures.append(f"a small random {model_class.__name__} failed in the probe ({_first_line(err)})")
    return f"{CANNOT_CHECK} ({failures[0] if failures else 'its config could not be shrunk for the probe'})"


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _text_config(config):
    """The config of the language model (itself, or a multimodal model's text_config)."""
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # several text configs (an encoder and a decoder): the top one holds the settings
        return config


def _attn_implementation(config) -> str | None:
    return _text_config(config)._attn_implementation or config._attn_implementation


def _unwrapped(model_or_config) -> tuple[type[nn.Module] | None, object]:
    """The transformers model class to probe, and its config."""
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_or_config), None), model_or_config
    model = unwrap(model_or_config)
    return type(model), model.config


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------

# Example lengths packed into rows of PACKED_ROW_LENGTH (best-fit decreasing: rows of 6+5 and 4+3+2 tokens, each
# ending in padding), short enough for any sliding window.
PROBE_EXAMPLE_LENGTHS = (5, 3, 4, 6, 2)
PACKED_ROW_LENGTH = 12


def _probe_token_ids(config, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random ids of ordinary tokens (no image, audio or other special token)."""
    special = set()
    for c in config_tree(config):
        for key in special_token_names(c.to_dict()):
            value = getattr(c, key, None)
            special.update(value if isinstance(value, list) else [value])
    ordinary = torch.tensor([i for i in range(_text_config(config).vocab_size) if i not in special])
    return ordinary[torch.randint(len(ordinary), (count,), generator=generator)]


def _packed_batch(config, flatten: bool) -> dict[str, torch.Tensor]:
    """Probe examples packed by `pack_examples` and collated by `SFTCollator` as training does."""
    from datasets import Dataset

    from finetune.lm.collate import SFTCollator
    from finetune.lm.packing import pack_examples

    generator = torch.Generator().manual_seed(PROBE_SEED)
    ids = _probe_token_ids(config, sum(PROBE_EXAMPLE_LENGTHS), generator).split(PROBE_EXAMPLE_LENGTHS)
    examples = Dataset.from_dict({"input_ids": [x.tolist() for x in ids], "labels": [x.tolist() for x in ids]})
    rows = pack_examples(examples, PACKED_ROW_LENGTH).with_format(None)
    pad = getattr(_text_config(config), "pad_token_id", None)
    collate = SFTCollator(pad_token_id=pad if is_count(pad) else 0, flatten=flatten)
    return collate([dict(row) for row in rows])


def packing_deviation(model: nn.Module, flatten: bool = False) -> float:
    """How far each example's logits in packed rows are from its logits run alone, relative to their scale:
    ~1e-7 (fp32 rounding) when the model keeps packed examples apart.

    `flatten`: the whole batch in one row, as `SFTCollator(flatten=True)` makes it for flash attention. Every
    sequence of the collated rows counts, the collator's padding tail included (it is a sequence of its own).
    """
    batch = _packed_batch(model.config, flatten)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    worst = 0.0
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits  # as next_token_loss runs it
        for row, positions in enumerate(batch["position_ids"]):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
            for start, end in itertools.pairwise(starts):
                alone = model(input_ids=batch["input_ids"][row, start:end][None], use_cache=False).logits[0]
                worst = max(worst, _deviation(packed[row, start:end], alone))
    return worst


def _packing_probe(flatten: bool) -> Callable[[nn.Module], str | None]:
    def probe(model: nn.Module) -> str | None:
        deviation = packing_deviation(model, flatten)
        if deviation <= PROBE_RTOL:
            return None
        return (
            f"in a small random {type(model).__name__} the examples packed in a row attend to each other: their "
            f"logits differ from those of each example run alone by {deviation:.1e} (relative)"
        )  # NaN included

    return probe


_packing_verdicts: dict[tuple, str | None] = {}


def _packing_problem(model_class: type[nn.Module], config, flatten: bool) -> str | None:
    """None when packed rows give each example the logits it gets alone, else what went wrong. Cached."""
    key = _probe_key(model_class, config, flatten)
    if key not in _packing_verdicts:
        _packing_verdicts[key] = _run_on_tiny(model_class, config, _packing_probe(flatten))
    return _packing_verdicts[key]


def _with_attn_implementation(config, implementation: str):
    config = copy.deepcopy(config)
    for c in config_tree(config):
        c._attn_implementation_internal = implementation
    return config


def check_packing_supported(model_or_config, rows_per_batch: int | None = None) -> None:
    """Refuse (UserError) a model that would let the examples packed into one row attend to each other.

    Packed rows carry per-example position_ids restarting at 0 and no attention_mask; transformers separates the
    examples by those position_ids where the model's masks and attention implementation let it. Whether they do
    is probed: a tiny instance of the model's class with the same attention implementation (see the module
    docstring) runs rows packed and collated as training does (`rows_per_batch=1`: the collator's one flattened
    row, as for flash attention) against each example alone, with `use_cache=False` as `next_token_loss` runs
    it (with a cache, transformers does not look for packed examples). Takes a model (also wrapped: DDP, peft,
    compiled) or a config.
    """
    model_class, config = _unwrapped(model_or_config)
    fix = "set data.packing=false"
    if model_class is None:
        name = type(config).__name__.removesuffix("Config") or "model"
        raise UserError(
            f"data.packing: cannot check that {name} keeps packed examples apart (its model class is not "
            f"known to transformers' AutoModelForCausalLM); {fix}"
        )
    flatten = rows_per_batch == 1
    problem = _packing_problem(model_class, config, flatten)
    if problem is None:
        return
    implementation = _attn_implementation(config)
    setting = f"model.attn_implementation={implementation}" if implementation else "the default attention"
    if getattr(_text_config(config), "is_causal", True) is False:
        problem += " (it runs bidirectional attention: is_causal=False)"
    if is_flash(implementation) and not flatten and _packing_problem(model_class, config, flatten=True) is None:
        raise UserError(
            f"data.packing with {setting} on {model_class.__name__}: {problem}. transformers' flash-attention "
            "path separates packed examples only when a batch holds a single row (as the SFT recipe's collator "
            f"makes it for flash attention). Set model.attn_implementation=sdpa or flex_attention, or {fix}"
        )
    if implementation not in (None, "sdpa"):  # None: transformers' default, sdpa where the model has it
        sdpa = _with_attn_implementation(config, "sdpa")
        if _packing_problem(model_class, sdpa, flatten) is None:
            fix = f"set model.attn_implementation=sdpa (it keeps them apart), or {fix}"
    raise UserError(f"data.packing with {setting} on {model_class.__name__}: {problem}; {fix}")


# --------------------------------------------------------------------------------------------
# Chunked loss
# --------------------------------------------------------------------------------------------

# The spread of the output layer's raw logits in the probe. A loss is neither linear nor scale-free in its logits
# only between a near-uniform softmax (tiny logits) and a near-hard max (huge ones, where CE(x / 16) ~ CE(x) / 16):
# at a spread of ~4, scaling the logits or soft-capping them (30 * tanh(x / 30)) changes the loss by percents.
PROBE_LOGIT_STD = 4.0


def plain_and_chunked_loss(model: nn.Module) -> tuple[float, float]:
    """(plain loss, chunked loss) of a probe model on one probe batch. Converts the model's output layer, after
    giving it its own weights (untied: the embeddings stay) scaled to raw logits of spread PROBE_LOGIT_STD."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    input_ids = _probe_token_ids(model.config, 2 * 8, generator).view(2, 8)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    head = model.get_output_embeddings()
    raw: list[torch.Tensor] = []
    with torch.no_grad():
        head.weight = nn.Parameter(torch.randn(head.weight.shape, generator=generator))
        hook = head.register_forward_hook(lambda module, args, out: raw.append(out))
        try:
            next_token_loss(model, batch)
        finally:
            hook.remove()
        head.weight *= PROBE_LOGIT_STD / float(raw[0].std())
        plain = float(next_token_loss(model, batch))
        chunk_output_layer(model)
        chunked = float(next_token_loss(model, batch))
    return plain, chunked


def _chunked_loss_probe(model: nn.Module) -> str | None:
    plain, chunked = plain_and_chunked_loss(model)
    if abs(chunked - plain) <= PROBE_RTOL * abs(plain):
        return None
    return (
        f"on a small random {type(model).__name__} the chunked loss is {chunked:.6g} where the plain one is "
        f"{plain:.6g}"
    )  # NaN included


def _logit_settings(config) -> str:
    """The config's settings named after logits that are on: a hint for the user, not the verdict."""
    found = []
    for c in config_tree(config):
        for key, value in c.to_dict().items():
            if "logit" in key and value not in (None, False, 0, 1):
                found.append(f"{key}={value}")
    return ", ".join(found)


_chunked_loss_verdicts: dict[tuple, str | None] = {}


def check_chunked_loss_exact(model: nn.Module) -> None:
    """Refuse (UserError) a model whose loss the chunked loss does not reproduce: one that changes its logits
    after the output layer (soft-capping, scaling, slicing), which a loss on the hidden states would skip.

    Probed on a tiny instance of the model's class (see the module docstring): the plain and the chunked
    `next_token_loss` of one small batch must agree to fp32 rounding. Cached per class and shrunk config.
    """
    model_class, config = _unwrapped(model)
    key = _probe_key(model_class, config)
    if key not in _chunked_loss_verdicts:
        _chunked_loss_verdicts[key] = _run_on_tiny(model_class, config, _chunked_loss_probe)
    problem = _chunked_loss_verdicts[key]
    if problem and problem.startswith(CANNOT_CHECK):
        raise ChunkedLossUnchecked(f"train.chunked_loss on {model_class.__name__}: {problem}")
    if problem:
        hint = _logit_settings(config)
        raise UserError(
            f"train.chunked_loss: {model_class.__name__} does more with its logits than return them ({problem}"
            f"{'; config: ' + hint if hint else ''}); a loss from the hidden states would skip that. Turn "
            "train.chunked_loss off"
        )


class ChunkedLossUnchecked(Exception):
    """The chunked-loss probe could not build or run a tiny instance of the model's class."""


def enable_exact_chunked_loss(model: nn.Module, chunk_size: int | None = None) -> bool:
    """`finetune.lm.loss.enable_chunked_loss` where the probe shows the chunked loss equals the model's own (a model
    that changes its logits after the output layer is refused with a UserError). A model class the probe cannot
    build keeps the plain loss, with a warning: more memory, the same numbers. Returns whether it is chunked."""
    try:
        check_chunked_loss_exact(unwrap(model))
    except ChunkedLossUnchecked as err:
        warnings.warn(f"{err}: training with the plain loss (full logits in memory)", stacklevel=2)
        return False
    enable_chunked_loss(model, chunk_size)
    return True


def chunked_evaluation_loss(model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor]):
    """The loss an evaluation runs: `loss_fn` itself when the model's output layer is chunked already (training's
    loss is); otherwise the same loss with the chunked output layer switched on for each evaluation batch only
    (where the probe shows it exact), so that an evaluation never holds (tokens x vocabulary) fp32 logits, even
    where training does (train.chunked_loss=false)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    if find_chunked_head(model) is not None or type(head) is not nn.Linear:
        return loss_fn
    try:
        check_chunked_loss_exact(base)
    except (ChunkedLossUnchecked, UserError):
        return loss_fn  # a model whose logits the chunked loss cannot reproduce keeps its plain loss

    def chunked_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        chunk_output_layer(model)
        try:
            return loss_fn(model, batch)
        finally:
            disable_chunked_loss(model)

    return chunked_loss
