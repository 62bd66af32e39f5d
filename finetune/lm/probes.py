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
place (`_reference_flash_kernels`, `_reference_flex_kernels`): what transformers decides around the kernel
(which rows it splits into examples by position_ids, which mask function it builds) is what gets probed.

Each verdict is kept for the process per model class, attention implementation and shrunk config. A probe costs
~0.1 s on one CPU thread for a LLaMA-like config (a 2-layer, 3M-parameter instance), ~0.5 s for the slowest
common architectures (torch fallbacks of linear-attention kernels).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from finetune.core.errors import UserError
from finetune.lm.loss import chunk_output_layer, enable_chunked_loss, next_token_loss, unwrap
from finetune.training.accumulation import IGNORE_INDEX

# --------------------------------------------------------------------------------------------
# The tiny instance
# --------------------------------------------------------------------------------------------

PROBE_SEED = 0
PROBE_LAYERS = 2
PROBE_HEADS = 4
PROBE_VOCAB = 128
PROBE_WIDTH = 64  # hidden size of a model without attention heads
PROBE_MAX_PARAMETERS = 50_000_000  # a LLaMA-like config shrinks to ~3M; this bounds what _shrink does not know

# Widths that nothing else is derived from, and the value each gets in the tiny instance where it is larger.
SMALL_WIDTHS = {
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,  # None: 4 x hidden size, set too
    "d_ff": 128,
    "intermediate_size_mlp": 128,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "shared_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
}
# State-space layers' widths, likewise, where the config has a state size (a chunk pads the sequence to its size).
SMALL_STATE_WIDTHS = {
    "state_size": 16,
    "ssm_state_size": 16,
    "mamba_d_state": 16,
    "chunk_size": 16,
    "mamba_chunk_size": 16,
    "n_groups": 1,
    "mamba_n_groups": 1,
    "mamba_ngroups": 1,
}
# Counts of experts and of the layers they start at, likewise.
SMALL_COUNTS = {
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,  # one dense layer, then MoE ones
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth")
HIDDEN_SIZES = ("hidden_size", "d_model", "n_embd", "embed_dim", "word_embed_proj_dim")
# (heads, key/value heads or None): the first pair found sets the hidden size (heads x head_dim); every pair
# found gets at most PROBE_HEADS heads with the same number of heads per key/value head.
HEAD_COUNTS = (
    ("num_attention_heads", "num_key_value_heads"),
    ("n_head", "n_head_kv"),
    ("num_heads", "num_kv_heads"),
    ("decoder_attention_heads", None),
    ("encoder_attention_heads", None),
    ("linear_num_value_heads", "linear_num_key_heads"),
    ("linear_num_heads", None),
)
# State-space layers: (heads, head dim, expansion); heads x head dim must stay expansion x hidden size.
SSM_HEADS = (
    ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
    ("mamba_num_heads", "mamba_head_dim", "expand"),
    ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
    ("num_heads", "head_dim", "expand"),
)
VOCAB_SIZES = ("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input")
# Settings that do not change what the model computes, dropped from the tiny config.
UNUSED_SETTINGS = ("quantization_config", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _special_token_names(config: dict) -> list[str]:
    return [k for k, v in config.items() if k.endswith(("_token_id", "_token_index")) and v is not None]


def _shrink_widths(config: dict) -> None:
    """PROBE_HEADS attention heads of the same head dimension (RoPE settings such as mrope sections or longrope
    factors are sized by it), so a hidden size of heads x head_dim; small MLPs."""
    pairs = [(q, kv) for q, kv in HEAD_COUNTS if _is_count(config.get(q))]
    hidden_key = next((k for k in HIDDEN_SIZES if _is_count(config.get(k))), None)
    old_hidden = config.get(hidden_key)
    new_hidden = min(old_hidden, PROBE_WIDTH) if old_hidden else None
    for i, (query, grouped) in enumerate(pairs):
        old_heads = config[query]
        config[query] = min(old_heads, PROBE_HEADS)
        if grouped and _is_count(config.get(grouped)):
            config[grouped] = max(1, config[query] * config[grouped] // old_heads)
        if i == 0 and old_hidden:
            head_dim = config["head_dim"] if _is_count(config.get("head_dim")) else old_hidden // old_heads
            new_hidden = config[query] * head_dim
    if new_hidden:
        for key in HIDDEN_SIZES:  # every width that equals the hidden size (word_embed_proj_dim, ...)
            if config.get(key) == old_hidden:
                config[key] = new_hidden
        for heads, head_dim, expand in SSM_HEADS:
            if all(_is_count(config.get(k)) for k in (heads, head_dim, expand)):
                config[heads] = min(config[heads], PROBE_HEADS)
                config[head_dim] = config[expand] * new_hidden // config[heads]
                if _is_count(config.get("mamba_d_ssm")):
                    config["mamba_d_ssm"] = config[heads] * config[head_dim]
                break
    has_state = any(_is_count(config.get(k)) for k in ("state_size", "ssm_state_size", "mamba_d_state"))
    for key, small in [*SMALL_WIDTHS.items(), *(SMALL_STATE_WIDTHS.items() if has_state else ())]:
        value = config.get(key)
        if isinstance(value, list):  # one per layer
            config[key] = [min(v, small) if _is_count(v) else v for v in value]
        elif (_is_count(value) and value > small) or (key == "n_inner" and key in config):
            config[key] = small


def _shrink_layers(config: dict) -> None:
    """PROBE_LAYERS layers, or one of each kind in layer_types (in the shared-KV tail too, if any)."""
    layers_key = next((k for k in LAYER_COUNTS if _is_count(config.get(k))), None)
    if layers_key is None or config[layers_key] <= PROBE_LAYERS:
        return
    old_layers = config[layers_key]
    types = config.get("layer_types") or [None] * old_layers
    shared = config.get("num_kv_shared_layers") or 0  # the last layers reuse earlier layers' keys and values
    kept: list[int] = []
    for part in (range(old_layers - shared), range(old_layers - shared, old_layers)):
        firsts = sorted({types[i]: i for i in reversed(part)}.values())  # the first layer of each kind
        kept += firsts + [i for i in part if i not in firsts][: max(0, PROBE_LAYERS - len(firsts))]
    kept.sort()
    config[layers_key] = len(kept)
    if shared:
        config["num_kv_shared_layers"] = sum(i >= old_layers - shared for i in kept)
    for key, value in config.items():  # per-layer lists (layer_types, mlp_layer_types, no_rope_layers, ...)
        if isinstance(value, list | tuple) and len(value) == old_layers:
            config[key] = [value[i] for i in kept]
    if isinstance(config.get("per_layer_config"), dict):  # {layer index: overrides}
        config["per_layer_config"] = {
            new: config["per_layer_config"][old]
            for new, old in enumerate(kept)
            if old in config["per_layer_config"] or str(old) in config["per_layer_config"]
        } or None


def _shrink_counts(config: dict, moved: dict[int, int]) -> None:
    """Few experts; PROBE_VOCAB tokens, the special tokens past it moved to the last ids, each its own (an image
    token must stay one): `moved` maps old ids to new ones across the nested configs."""
    for key, small in SMALL_COUNTS.items():
        if _is_count(config.get(key)) and config[key] > small:
            config[key] = small
    for key in VOCAB_SIZES:
        if _is_count(config.get(key)) and config[key] > PROBE_VOCAB:
            config[key] = PROBE_VOCAB
    for key in _special_token_names(config):
        ids = config[key] if isinstance(config[key], list) else [config[key]]
        for old in ids:
            if _is_count(old) and old >= PROBE_VOCAB and old not in moved:
                moved[old] = PROBE_VOCAB - 1 - len(moved)
        new = [moved.get(i, i) for i in ids]
        config[key] = new if isinstance(config[key], list) else new[0]


def _shrink(config: dict, nested: set[str], widths: bool, moved: dict[int, int]) -> None:
    """Shrink a config dict in place, and its nested configs (`nested` keys) likewise; `widths=False` keeps
    every width (for models whose widths depend on each other in ways _shrink_widths does not know)."""
    for key in nested:
        if isinstance(config.get(key), dict):  # a nested config's own nested configs are rare: left as they are
            _shrink(config[key], set(), widths, moved)
    if widths:
        _shrink_widths(config)
    _shrink_layers(config)
    _shrink_counts(config, moved)


def tiny_config(config, widths: bool = True):
    """A copy of `config` shrunk for a probe (see _shrink), with the same attention implementation(s)."""
    values = config.to_dict()
    for key in UNUSED_SETTINGS:
        values.pop(key, None)
    _shrink(values, set(type(config).sub_configs), widths, moved={})
    tiny = type(config).from_dict(values)
    _copy_attn_implementation(config, tiny)
    return tiny


def _config_tree(config) -> Iterator:
    """The config and its nested configs."""
    yield config
    for key in type(config).sub_configs:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _config_tree(sub)


def _copy_attn_implementation(source, target) -> None:
    for a, b in zip(_config_tree(source), _config_tree(target), strict=False):
        b._attn_implementation_internal = a._attn_implementation_internal


def _is_flash(implementation: str | None) -> bool:
    return bool(implementation) and implementation.startswith("flash_attention")


def tiny_model(model_class: type[nn.Module], config) -> nn.Module:
    """A random `model_class` instance from the tiny `config`: fp32, CPU, eval mode (no dropout), weights drawn
    from PROBE_SEED in a forked random state.

    Flash attention is set after construction: transformers' constructor refuses it where the flash-attn package
    is missing, and the probes swap the kernels for `_reference_flash_kernels` anyway.
    """
    implementations = [c._attn_implementation_internal for c in _config_tree(config)]
    for c in _config_tree(config):
        if _is_flash(c._attn_implementation_internal):
            c._attn_implementation_internal = "eager"
    with torch.device("meta"):  # first count: some configs have sizes _shrink does not know (hash embeddings)
        parameters = sum(p.numel() for p in model_class(config).parameters())
    if parameters > PROBE_MAX_PARAMETERS:
        raise ValueError(f"shrunk for the probe, it still has {parameters:,} parameters")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # whatever default device the caller set
        torch.manual_seed(PROBE_SEED)
        model = model_class(config)
    for c, implementation in zip(_config_tree(model.config), implementations, strict=False):
        if _is_flash(implementation):
            c._attn_implementation_internal = implementation
    return model.float().eval()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread; more only wait on each other's barriers (badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the expected tensor's largest entry."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# Over transformers 5.25's causal LMs (default configs shrunk): packed examples kept apart differ from alone by
# <4e-6 of the logits (fp32 rounding), examples that see each other by >1e-3; an exact chunked loss differs by
# <3e-7, one that skips a change to the logits by >0.5.
PROBE_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# Flash and flex attention on the CPU
# --------------------------------------------------------------------------------------------


def _attend(q, k, v, scale, causal, window, softcap, sink) -> torch.Tensor:
    """Softmax attention of q (T, H, D) over k, v (S, Hkv, D) as the flash kernels define it (bottom-right
    causal alignment, window (left, right) with -1 for none, tanh soft-cap, optional per-head sink logit)."""
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    t, s = q.shape[0], k.shape[0]
    query_pos = torch.arange(t, device=q.device)[:, None] + (s - t)
    key_pos = torch.arange(s, device=q.device)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool, device=q.device)
    left, right = window if window is not None else (-1, -1)
    if causal:
        allowed &= key_pos <= query_pos
    if left >= 0:
        allowed &= key_pos >= query_pos - left
    if right >= 0:
        allowed &= key_pos <= query_pos + right
    scores = scores.masked_fill(~allowed, -math.inf)
    if sink is not None:
        scores = torch.cat([scores, sink.float()[:, None, None].expand(heads, t, 1)], dim=-1)
    probs = scores.softmax(dim=-1)[..., :s]
    return torch.einsum("hts,shd->thd", probs, v.float()).to(q.dtype)


def _flash_reference(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, s_aux=None, **_
):
    """flash_attn_func on (B, T, H, D) rows."""
    rows = [_attend(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap, s_aux) for b in range(len(q))]
    return torch.stack(rows)


def _flash_varlen_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    s_aux=None,
    deterministic=False,
    **_,
):
    """flash_attn_varlen_func: sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] of the (total, H, D) inputs."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i : i + 2], bounds_k[i : i + 2]
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal, window_size, softcap, s_aux)
    return out


# The module state of transformers' flash-attention loader (modeling_flash_attention_utils), restored after a probe.
_FLASH_STATE = (
    "_lazy_imports",
    "_loaded_implementation",
    "_flash_fn",
    "_flash_varlen_fn",
    "_flash_with_kvcache_fn",
    "_pad_fn",
    "_unpad_fn",
    "_process_flash_kwargs_fn",
    "_process_with_kvcache_kwargs_fn",
)


@contextlib.contextmanager
def _reference_flash_kernels() -> Iterator[None]:
    """Make transformers' flash-attention path load the plain-torch kernels above, whatever is installed.

    Only the kernels change: transformers still decides, from the attention mask and position_ids, whether to
    call the padded, the varlen or the plain kernel. (If an upstream refactor renames this state, the probe
    fails, and packing is refused rather than assumed.)
    """
    from transformers import modeling_flash_attention_utils as flash

    saved = {name: getattr(flash, name) for name in _FLASH_STATE}

    def load_reference(*args, **kwargs):
        return _flash_reference, _flash_varlen_reference, None, flash._pad_input, flash._unpad_input

    flash._lazy_imports = load_reference
    flash._loaded_implementation = None  # the next call loads
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(flash, name, value)


def _flex_reference(query, key, value, score_mod=None, block_mask=None, scale=None, **kwargs):
    """torch's flex_attention on (B, H, T, D) inputs, computed densely: the block mask's mask_mod and the
    score_mod evaluated at every (batch, head, query, key)."""
    from torch.nn.attention.flex_attention import AuxOutput, create_mask

    batch, heads, length, dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    scores = query.float() @ key.float().transpose(-1, -2) * (scale if scale is not None else dim**-0.5)
    if score_mod is not None:
        b, h, q, kv = (
            torch.arange(n).view([-1 if i == j else 1 for j in range(4)]) for i, n in enumerate(scores.shape)
        )
        scores = score_mod(scores, b, h, q, kv)
    if block_mask is not None:
        allowed = create_mask(block_mask.mask_mod, batch, heads, length, key.shape[-2], device=query.device)
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = scores.logsumexp(dim=-1)
    out = ((scores - lse[..., None]).exp().nan_to_num(0.0) @ value.float()).to(query.dtype)  # no key: zeros
    if kwargs.get("return_aux") is not None:
        return out, AuxOutput(lse=lse)
    return (out, lse) if kwargs.get("return_lse") else out


@contextlib.contextmanager
def _reference_flex_kernels() -> Iterator[None]:
    """Make transformers' flex-attention path run uncompiled: its block masks built by torch's create_block_mask
    without compiling, and `_flex_reference` as the kernel. Compiling both for the CPU takes tens of seconds.

    transformers still builds the mask function (causal, packed sequences, sliding window, ...) that decides what
    attends to what. (If an upstream refactor renames this state, the probe fails and packing is refused.)
    """
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils
    from transformers.integrations import flex_attention as flex

    saved = masking_utils.create_block_mask, flex.WrappedFlexAttention._instance
    uncompiled = object.__new__(flex.WrappedFlexAttention)  # the singleton that holds the compiled kernel
    uncompiled._is_flex_compiled, uncompiled.training = True, False  # probe models are in eval mode
    uncompiled._compiled_flex_attention = _flex_reference
    masking_utils.create_block_mask = lambda *args, _compile=False, **kwargs: create_block_mask(*args, **kwargs)
    flex.WrappedFlexAttention._instance = uncompiled
    try:
        yield
    finally:
        masking_utils.create_block_mask, flex.WrappedFlexAttention._instance = saved


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
    if _is_flash(implementation):
        kernels = _reference_flash_kernels()
    elif "flex_attention" in implementation:
        kernels = _reference_flex_kernels()
    else:
        kernels = contextlib.nullcontext()
    failures = []
    with _one_thread(), kernels:
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
    for c in _config_tree(config):
        for key in _special_token_names(c.to_dict()):
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
    collate = SFTCollator(pad_token_id=pad if _is_count(pad) else 0, flatten=flatten)
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
    for c in _config_tree(config):
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
    if _is_flash(implementation) and not flatten and _packing_problem(model_class, config, flatten=True) is None:
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
    for c in _config_tree(config):
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
