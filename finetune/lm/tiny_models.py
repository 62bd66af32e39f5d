"""A tiny instance of a model class: its config shrunk to 2 layers and small widths, random weights, fp32, on the CPU,
seeded without touching the caller's random state (what `finetune.lm.probes` runs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

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


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def special_token_names(config: dict) -> list[str]:
    return [k for k, v in config.items() if k.endswith(("_token_id", "_token_index")) and v is not None]


def _shrink_widths(config: dict) -> None:
    """PROBE_HEADS attention heads of the same head dimension (RoPE settings such as mrope sections or longrope
    factors are sized by it), so a hidden size of heads x head_dim; small MLPs."""
    pairs = [(q, kv) for q, kv in HEAD_COUNTS if is_count(config.get(q))]
    hidden_key = next((k for k in HIDDEN_SIZES if is_count(config.get(k))), None)
    old_hidden = config.get(hidden_key)
    new_hidden = min(old_hidden, PROBE_WIDTH) if old_hidden else None
    for i, (query, grouped) in enumerate(pairs):
        old_heads = config[query]
        config[query] = min(old_heads, PROBE_HEADS)
        if grouped and is_count(config.get(grouped)):
            config[grouped] = max(1, config[query] * config[grouped] // old_heads)
        if i == 0 and old_hidden:
            head_dim = config["head_dim"] if is_count(config.get("head_dim")) else old_hidden // old_heads
            new_hidden = config[query] * head_dim
    if new_hidden:
        for key in HIDDEN_SIZES:  # every width that equals the hidden size (word_embed_proj_dim, ...)
            if config.get(key) == old_hidden:
                config[key] = new_hidden
        for heads, head_dim, expand in SSM_HEADS:
            if all(is_count(config.get(k)) for k in (heads, head_dim, expand)):
                config[heads] = min(config[heads], PROBE_HEADS)
                config[head_dim] = config[expand] * new_hidden // config[heads]
                if is_count(config.get("mamba_d_ssm")):
                    config["mamba_d_ssm"] = config[heads] * config[head_dim]
                break
    has_state = any(is_count(config.get(k)) for k in ("state_size", "ssm_state_size", "mamba_d_state"))
    for key, small in [*SMALL_WIDTHS.items(), *(SMALL_STATE_WIDTHS.items() if has_state else ())]:
        value = config.get(key)
        if isinstance(value, list):  # one per layer
            config[key] = [min(v, small) if is_count(v) else v for v in value]
        elif (is_count(value) and value > small) or (key == "n_inner" and key in config):
            config[key] = small


def _shrink_layers(config: dict) -> None:
    """PROBE_LAYERS layers, or one of each kind in layer_types (in the shared-KV tail too, if any)."""
    layers_key = next((k for k in LAYER_COUNTS if is_count(config.get(k))), None)
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
        if is_count(config.get(key)) and config[key] > small:
            config[key] = small
    for key in VOCAB_SIZES:
        if is_count(config.get(key)) and config[key] > PROBE_VOCAB:
            config[key] = PROBE_VOCAB
    for key in special_token_names(config):
        ids = config[key] if isinstance(config[key], list) else [config[key]]
        for old in ids:
            if is_count(old) and old >= PROBE_VOCAB and old not in moved:
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


def config_tree(config) -> Iterator:
    """The config and its nested configs."""
    yield config
    for key in type(config).sub_configs:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from config_tree(sub)


def _copy_attn_implementation(source, target) -> None:
    for a, b in zip(config_tree(source), config_tree(target), strict=False):
        b._attn_implementation_internal = a._attn_implementation_internal


def is_flash(implementation: str | None) -> bool:
    return bool(implementation) and implementation.startswith("flash_attention")


def tiny_model(model_class: type[nn.Module], config) -> nn.Module:
    """A random `model_class` instance from the tiny `config`: fp32, CPU, eval mode (no dropout), weights drawn
    from PROBE_SEED in a forked random state.

    Flash attention is set after construction: transformers' constructor refuses it where the flash-attn package
    is missing, and the probes swap the kernels for `reference_flash_kernels` anyway.
    """
    implementations = [c._attn_implementation_internal for c in config_tree(config)]
    for c in config_tree(config):
        if is_flash(c._attn_implementation_internal):
            c._attn_implementation_internal = "eager"
    with torch.device("meta"):  # first count: some configs have sizes _shrink does not know (hash embeddings)
        parameters = sum(p.numel() for p in model_class(config).parameters())
    if parameters > PROBE_MAX_PARAMETERS:
        raise ValueError(f"shrunk for the probe, it still has {parameters:,} parameters")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # whatever default device the caller set
        torch.manual_seed(PROBE_SEED)
        model = model_class(config)
    for c, implementation in zip(config_tree(model.config), implementations, strict=False):
        if is_flash(implementation):
            c._attn_implementation_internal = implementation
    return model.float().eval()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread; more only wait on each other's barriers (badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
