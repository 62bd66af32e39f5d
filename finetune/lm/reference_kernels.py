"""Dense plain-torch stand-ins for the flash- and flex-attention kernels, which do not run (or compile for tens of
seconds) on a CPU: the probes run transformers' own flash and flex paths with these in place."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

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
def reference_flash_kernels() -> Iterator[None]:
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
def reference_flex_kernels() -> Iterator[None]:
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
