"""Whether a model keeps packed examples apart (position ids reset per example)."""

from __future__ import annotations

import ast
import inspect
import sys

from finetune.core.errors import UserError
from finetune.lm.loss import _unwrap

# --------------------------------------------------------------------------------------------
# Packing guard
# --------------------------------------------------------------------------------------------

# Attention implementations whose mask transformers builds with the packed-sequence (block-diagonal) pattern
# from position_ids (masking_utils.create_causal_mask: find_packed_sequence_indices, then
# packed_sequence_mask_function, for sdpa_mask / eager_mask / flex_attention_mask alike).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")
_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
_PACKING_MASKS = {"create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask"}
_LEAKY_MASKS = {
    "create_recurrent_attention_mask": "recurrent (state-space / linear-attention) layers carry state from one "
    "example into the next"
}


def _builds_kwargs_with_positions(value: ast.AST, with_positions: set[str]) -> bool:
    """`{..., "position_ids": ...}`, `dict(..., position_ids=...)`, or a copy of such a dict."""
    if isinstance(value, ast.Dict):
        return any(
            (isinstance(k, ast.Constant) and k.value == "position_ids")
            or (k is None and isinstance(v, ast.Name) and v.id in with_positions)  # {**mask_kwargs, ...}
            for k, v in zip(value.keys, value.values, strict=True)
        )
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
        return any(k.arg == "position_ids" for k in value.keywords) or any(
            isinstance(a, ast.Name) and a.id in with_positions for a in value.args
        )
    return (  # mask_kwargs.copy()
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "copy"
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id in with_positions
    )


def _mask_calls(source: str) -> list[tuple[str, bool, int]]:
    """(mask builder, passes position_ids?, line) for each call of a transformers mask builder in `source`,
    following `f = create_causal_mask if ... else create_sliding_window_causal_mask` and `**mask_kwargs` dicts."""
    builders = _PACKING_MASKS | set(_LEAKY_MASKS)
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        aliases: dict[str, str] = {}
        with_positions: set[str] = set()
        assignments = sorted(
            (n for n in ast.walk(function) if isinstance(n, ast.Assign)), key=lambda n: (n.lineno, n.col_offset)
        )
        for node in assignments:
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            value = node.value
            used = [n.id for n in ast.walk(value) if isinstance(n, ast.Name) and n.id in builders]
            if used and not isinstance(value, ast.Call):  # f = create_causal_mask if ... else ...
                aliases.update(dict.fromkeys(names, used[0]))
            if _builds_kwargs_with_positions(value, with_positions):
                with_positions.update(names)
            for target in node.targets:  # mask_kwargs["position_ids"] = ...
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and isinstance(target.slice, ast.Constant)
                    and target.slice.value == "position_ids"
                ):
                    with_positions.add(target.value.id)
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            builder = name if name in builders else aliases.get(name)
            if builder is None:
                continue
            positions = any(
                k.arg == "position_ids"
                or (k.arg is None and isinstance(k.value, ast.Name) and k.value.id in with_positions)
                for k in node.keywords
            )
            found.append((builder, positions, node.lineno))
    return found


def _model_classes(model_or_config) -> tuple[list[type], object]:
    """The model classes whose modules build the attention masks, and the config."""
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        config = model_or_config
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            classes = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]]
        except KeyError:
            classes = []
        return classes, config
    model = _unwrap(model_or_config)
    from transformers import PreTrainedModel

    classes = list(dict.fromkeys(type(m) for m in model.modules() if isinstance(m, PreTrainedModel)))
    return classes, model.config


def check_packing_supported(model_or_config, rows_per_batch: int | None = None) -> None:
    """Refuse (UserError) a model that would let the examples packed into one row attend to each other.

    Packed rows carry per-example position_ids restarting at 0 and no attention_mask. transformers 5 then
    builds a block-diagonal causal mask (masking_utils: `_preprocess_mask_arguments` calls
    `find_packed_sequence_indices(position_ids)`, which starts a new example wherever the position does not
    grow by 1, and `create_causal_mask` adds `packed_sequence_mask_function` and remaps positions with
    `remap_positions_for_packed_sequence`), and the rotary embeddings take the same restarting positions.
    That holds for:

    - eager, sdpa, flex_attention: the mask functions get the packed pattern (`eager_mask` and
      `flex_attention_mask` apply `mask_function`; sdpa materialises the mask, `is_causal` is not used).
    - flash_attention_2/3/4: `flash_attention_mask` drops the mask function; the kernels find the examples
      from position_ids only when the batch has ONE row (`_is_packed_sequence` in
      modeling_flash_attention_utils returns False for batch_size != 1), otherwise they run plain causal
      attention over the whole row. Allowed only with `rows_per_batch=1`.

    Only with no cache: with `use_cache=True` (the config default of most models) the forward creates a
    DynamicCache first and `_preprocess_mask_arguments` skips the packed detection (`cache is None`), so
    the examples see each other. `next_token_loss` passes `use_cache=False`; any other forward over
    packed rows must too.

    The architecture must build its masks with `create_causal_mask` (or the sliding-window / chunked
    variants), passing position_ids, and have no recurrent layers; checked on the source of the model's
    modules. `config.is_causal=False` (bidirectional) is refused.
    """
    classes, config = _model_classes(model_or_config)
    configs = [config]
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        configs.append(text_config)
    name = type(config).__name__.removesuffix("Config") or "model"
    fix = "set data.packing=false"

    for cfg in configs:
        if getattr(cfg, "is_causal", True) is False:
            raise UserError(f"data.packing: {name} runs bidirectional attention (is_causal=False); {fix}")
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is None or impl in PACKING_ATTENTION:
            continue  # None: transformers will pick sdpa, or eager where sdpa is not supported
        if impl in _FLASH and rows_per_batch == 1:
            continue
        if impl in _FLASH:
            raise UserError(
                f"data.packing with model.attn_implementation={impl}: transformers' flash-attention path only "
                "separates packed examples when a batch holds a single row (it reads them from position_ids "
                "then); with several rows the examples of a row attend to each other. Set "
                f"model.attn_implementation=sdpa or flex_attention, or {fix}"
            )
        raise UserError(
            f"data.packing with model.attn_implementation={impl}: only {', '.join(PACKING_ATTENTION)} (and "
            "flash_attention_* with one row per batch) keep packed examples apart; set "
            f"model.attn_implementation=sdpa, or {fix}"
        )

    if not classes:
        raise UserError(
            f"data.packing: cannot check that {name} keeps packed examples apart (its model class is not "
            f"known to transformers' AutoModelForCausalLM); {fix}"
        )
    modules = list(dict.fromkeys(sys.modules.get(c.__module__) for c in classes))
    calls = []
    for module in modules:
        try:
            calls += _mask_calls(inspect.getsource(module))
        except (OSError, TypeError, SyntaxError):
            raise UserError(f"data.packing: cannot read the source of {module.__name__} to check it; {fix}") from None
    leaky = sorted({builder for builder, _, _ in calls if builder in _LEAKY_MASKS})
    if leaky:
        raise UserError(f"data.packing: {name} cannot keep packed examples apart: its {_LEAKY_MASKS[leaky[0]]}; {fix}")
    if not any(builder in _PACKING_MASKS for builder, _, _ in calls):
        raise UserError(
            f"data.packing: {name} does not build its attention mask with transformers' create_causal_mask, so "
            f"nothing separates packed examples (model.attn_implementation does not change that); {fix}"
        )
    blind = [line for builder, positions, line in calls if builder in _PACKING_MASKS and not positions]
    if blind:
        raise UserError(
            f"data.packing: {name} builds an attention mask without position_ids (line {blind[0]} of "
            f"{[m.__name__ for m in modules]}), so packed examples would attend to each other; {fix}"
        )
