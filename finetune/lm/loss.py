"""The causal-LM loss without the (tokens x vocabulary) logits.

**Chunked loss.** The plain loss projects every position onto the vocabulary: B*T*V logits, upcast to fp32,
then a log-softmax and its gradient of the same size (for 8 x 4096 tokens and a 128k vocabulary, 16 GiB
for the fp32 logits alone). `chunked_next_token_loss` instead keeps only the positions whose next token
carries loss, and walks over them `chunk_size` rows at a time: per chunk it projects, takes an fp32
log-softmax, adds the chunk's summed cross-entropy, and (when gradients are wanted) computes right away the
chunk's gradients with respect to the hidden states, the output weight and the bias, as Liger-kernel's
fused linear cross-entropy does. Backward then only scales those by the incoming gradient. (Under fp16
autocast the gradients are instead recomputed chunk by chunk in backward, where the GradScaler's loss scale
is known: one more matmul per chunk.) Peak memory is about 2.5 chunks of fp32 logits plus one weight-sized
gradient, which backward needs anyway. Numerically it is the same loss: fp64 agrees with the plain loss to
~1e-15, fp32 to its rounding.

**Where it runs.** Under DDP, FSDP2 (parameters are whole only inside their module's forward) and DeepSpeed
ZeRO-3 (parameters gathered by module hooks) the output weight may only be used inside the output layer's
own forward. `enable_chunked_loss` therefore turns the model's output layer, in place, into a
`ChunkedLossHead`: the same `nn.Linear` object with the same parameters (state dict keys, weight tying,
`save_pretrained`, hooks unchanged; `isinstance(head, nn.Linear)` still holds) whose forward, while labels
are attached with `head.targets(labels)`, returns the summed loss (shape (1, 1, 1), in place of the logits)
instead of logits. Without attached labels it is the plain linear layer (generation, evaluation).
`next_token_loss(model, batch)` does the attaching; it works through DDP, FSDP2, DeepSpeed and peft wrappers
since it only calls the wrapper's forward.

**Which models.** The chunked loss is the model's loss only if the model returns its output layer's result
as the logits; `enable_chunked_loss` checks that by running a tiny instance of the model's class
(`finetune.lm.probes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from finetune.core.errors import UserError
from finetune.training.accumulation import IGNORE_INDEX, summed_next_token_loss

# Rows per chunk when none is given: as many as keep a chunk near CHUNK_LOGITS logits (2**27 = 512 MiB in
# fp32), a multiple of 64 within [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]: 4096 rows for a 32k vocabulary, 1024 for
# 128k, 832 for 152k, 512 for 256k. Rows, not logits, set the speed: each chunk adds its (vocabulary x hidden)
# weight-gradient product into an fp32 accumulator, a memory-bound pass whose cost relative to the chunk's
# three matmuls is about (GPU flops / memory bandwidth) / (0.6 * rows): ~1 at 512 rows on an H100 in bf16,
# ~0.5 at 1024, ~0.1 at 4096. Memory is about 2.5 chunks of fp32 logits (the logits, turned in place into
# their gradient, and its copy in the compute dtype) besides the weight-sized gradient.
CHUNK_LOGITS = 2**27
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 4096


def lm_loss_chunk_rows(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: `chunk_size` if given, else about CHUNK_LOGITS / vocab_size (see CHUNK_LOGITS)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    rows = CHUNK_LOGITS // max(int(vocab_size), 1)
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows // 64 * 64))


# --------------------------------------------------------------------------------------------
# The chunked loss
# --------------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's (as `F.linear` would under autocast, which leaves fp64
    alone), else the inputs' common dtype."""
    device_type = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        autocast_dtype = torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    if enabled and torch.float64 not in (hidden.dtype, weight.dtype):
        return autocast_dtype
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int,
    compute: torch.dtype,
    grads: tuple[bool, bool, bool] = (False, False, False),
    grad_scale: torch.Tensor | None = None,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets` (every row counts), and the
    gradients of that sum w.r.t. (hidden, weight, bias) that `grads` asks for, times `grad_scale` if given,
    `chunk_rows` rows at a time. `per_row`: each row's cross-entropy (N,) instead of their sum, and `grad_scale`
    may then hold one scale per row (N,): the gradients of sum(grad_scale * row losses), as a sequence-level loss
    (DPO) needs.

    The projection and the gradient matmuls run in `compute`, the log-softmax in fp32 (fp64 for fp64). The
    weight and bias gradients are accumulated over chunks in fp32 (or fp64) and returned in the parameters'
    dtype, the hidden-state gradient in the hidden states' dtype.
    """
    need_h, need_w, need_b = grads
    acc = torch.promote_types(compute, torch.float32)  # the log-softmax and the loss sum
    with torch.autocast(hidden.device.type, enabled=False):  # every cast below is explicit
        w = weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        loss = torch.zeros((hidden.shape[0],) if per_row else (), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=weight.device)
            if need_w
            else None  # a frozen output layer (LoRA): no weight-sized buffer
        )
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        scale = grad_scale.to(acc) if grad_scale is not None else None
        for start in range(0, hidden.shape[0], chunk_rows):
            x = hidden[start : start + chunk_rows].to(compute)
            t = targets[start : start + chunk_rows]
            logits = (torch.addmm(b, x, w.t()) if b is not None else x @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            row_loss = lse - logits[rows, t]
            if per_row:
                loss[start : start + chunk_rows] = row_loss
            else:
                loss += row_loss.sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of -log softmax[target]) / d(logits) = softmax - one_hot(target), in place of the logits
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs[rows, t] -= 1
            if scale is not None:  # before the cast: fp16 keeps the loss scale's range, as in plain autograd
                probs.mul_(scale if scale.dim() == 0 else scale[start : start + chunk_rows, None])
            g = probs.to(compute)
            if grad_h is not None:
                grad_h[start : start + chunk_rows] = g @ w
            if grad_w is not None:
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), x)
                else:
                    grad_w += g.t() @ x
            if grad_b is not None:
                grad_b += probs.sum(dim=0)
            del logits, probs, g
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss, grad_h, grad_w, grad_b


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear projection, chunk by chunk.

    Default: the gradients are computed in forward along with the loss (three matmuls per chunk, as
    Liger-kernel does) and backward scales them by the incoming gradient. With `recompute`, forward computes
    the loss only and backward recomputes each chunk's logits (four matmuls per chunk): the gradient then
    carries the incoming scale before it is cast to the compute dtype, which fp16 needs (the GradScaler's
    loss scale keeps small gradients from flushing to zero); bf16 has fp32's range and does not.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compute, recompute):
        need = ctx.needs_input_grad
        ctx.grads_wanted = (need[0], need[1], need[2] and bias is not None)
        ctx.chunk_rows, ctx.compute, ctx.recompute = chunk_rows, compute, recompute
        if recompute:
            ctx.save_for_backward(hidden, weight, bias, targets)
            return _chunked_pass(hidden, weight, bias, targets, chunk_rows, compute)[0]
        loss, *ctx.grads = _chunked_pass(hidden, weight, bias, targets, chunk_rows, compute, ctx.grads_wanted)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            hidden, weight, bias, targets = ctx.saved_tensors
            _, *grads = _chunked_pass(
                hidden, weight, bias, targets, ctx.chunk_rows, ctx.compute, ctx.grads_wanted, grad_output
            )
        else:
            if ctx.grads is None:
                raise RuntimeError("the chunked LM loss cannot be differentiated twice")
            grads, ctx.grads = ctx.grads, None
            # In place: the weight gradient is as large as the weight, no second copy of it.
            grads = [g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute: bool | None = None,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets) for hidden (N, H), weight (V, H) and
    targets (N,) (no ignore index: drop those rows first), never holding more than one chunk of logits.

    Under autocast the projection runs in autocast's dtype, as `F.linear` would. `recompute` (default: only
    when that dtype is fp16) computes the gradients in backward instead of forward; see _ChunkedCrossEntropy.
    """
    chunk_rows = lm_loss_chunk_rows(weight.shape[0], chunk_size)
    compute = _compute_dtype(hidden, weight)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        recompute = compute == torch.float16 if recompute is None else recompute
        return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, compute, recompute)
    return _chunked_pass(hidden, weight, bias, targets, chunk_rows, compute)[0]


class _ChunkedRowCrossEntropy(torch.autograd.Function):
    """Each row's cross-entropy of a linear projection (N,), chunk by chunk: the gradient of a loss that is not a
    plain sum of them (DPO's, of per-sequence sums) weighs each row by its own incoming gradient.

    With a frozen output layer (LoRA) the hidden-state gradients are computed in forward at unit scale (two
    matmuls per chunk) and backward scales each row; when the weight or bias trains (or under fp16) backward
    recomputes each chunk's logits with the rows' scales (four matmuls), since the weight gradient sums over rows
    weighted by scales known only in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compute):
        need = ctx.needs_input_grad
        ctx.grads_wanted = (need[0], need[1], need[2] and bias is not None)
        ctx.chunk_rows, ctx.compute = chunk_rows, compute
        ctx.recompute = ctx.grads_wanted[1] or ctx.grads_wanted[2] or compute == torch.float16
        if ctx.recompute:
            ctx.save_for_backward(hidden, weight, bias, targets)
            return _chunked_pass(hidden, weight, bias, targets, chunk_rows, compute, per_row=True)[0]
        losses, ctx.grad_hidden, _, _ = _chunked_pass(
            hidden, weight, bias, targets, chunk_rows, compute, ctx.grads_wanted, per_row=True
        )
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            hidden, weight, bias, targets = ctx.saved_tensors
            _, *grads = _chunked_pass(
                hidden, weight, bias, targets, ctx.chunk_rows, ctx.compute, ctx.grads_wanted, grad_output, per_row=True
            )
            return grads[0], grads[1], grads[2], None, None, None
        grad_hidden, ctx.grad_hidden = ctx.grad_hidden, None
        if grad_hidden is None and ctx.grads_wanted[0]:
            raise RuntimeError("the chunked per-row loss cannot be differentiated twice")
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)[:, None])
        return grad_hidden, None, None, None, None, None


def chunked_linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) of each row (N,), fp32 (fp64 for fp64 inputs), never holding
    more than one chunk of logits; differentiable (see _ChunkedRowCrossEntropy)."""
    chunk_rows = lm_loss_chunk_rows(weight.shape[0], chunk_size)
    compute = _compute_dtype(hidden, weight)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ChunkedRowCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, compute)
    return _chunked_pass(hidden, weight, bias, targets, chunk_rows, compute, per_row=True)[0]


def chunked_next_token_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute: bool | None = None,
) -> torch.Tensor:
    """The summed next-token loss of `summed_next_token_loss(hidden_states @ weight.T + bias, labels)`.

    hidden_states (B, T, H) are the final hidden states, weight (V, H) the output layer's, labels (B, T)
    unshifted (position t predicts labels[t + 1]; -100 is ignored). Positions without a target are dropped
    before the projection. The result is fp32 (fp64 for fp64 inputs), 0 when no position has a target.
    """
    if labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the hidden states {tuple(hidden_states.shape[:-1])}"
        )
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden_states[..., :-1, :][keep]  # (N, H): only the positions that carry loss
    return chunked_linear_cross_entropy(hidden, weight, targets[keep], bias, chunk_size, recompute)


# --------------------------------------------------------------------------------------------
# The output layer that returns the loss
# --------------------------------------------------------------------------------------------


class ChunkedLossHead(nn.Linear):
    """A model's `nn.Linear` output layer, converted in place by `enable_chunked_loss`.

    Without attached labels it is the plain linear layer. Inside `with head.targets(labels):` its next
    forward returns, in place of the logits, the summed next-token loss of its input hidden states
    (B, T, H) against labels (B, T), shaped (1, 1, 1). The loss is computed inside this module's forward,
    where DDP, FSDP2 and DeepSpeed ZeRO-3 have the weight whole and see its gradient.
    """

    chunk_size: int | None = None
    _targets: torch.Tensor | None = None
    _loss_fn = None

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor, loss_fn=None) -> Iterator[None]:
        """Attach `labels` (B, T, unshifted) for the next forward, which returns the loss: the summed next-token
        loss, or `loss_fn(hidden_states, weight, labels, bias, chunk_size)` (a 1-d tensor, e.g. DPO's log-probs
        per sequence), shaped (1, 1, n)."""
        if self._targets is not None:
            raise RuntimeError("labels are already attached to this ChunkedLossHead")
        self._targets, self._loss_fn = labels, loss_fn
        try:
            yield
        finally:
            self._targets, self._loss_fn = None, None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        labels = self._targets
        if labels is None:
            return super().forward(input)
        self._targets = None  # one forward per attachment: a second call is the plain layer again
        if input.shape[:-1] != labels.shape:
            raise RuntimeError(
                f"the output layer got hidden states {tuple(input.shape[:-1])} for labels {tuple(labels.shape)}: "
                "the model did not pass every position to it (logits_to_keep, extra tokens?), so the chunked "
                "loss cannot pair them; turn the chunked loss off for this model"
            )
        loss_fn, self._loss_fn = self._loss_fn or chunked_next_token_loss, None
        loss = loss_fn(input, self.weight, labels, self.bias, self.chunk_size)
        # Not a view: FSDP2 hooks a module's outputs for backward, and warns about views (in-place ops on one
        # would drop the hook).
        return loss.reshape(1, 1, -1).clone()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DeepSpeed (`.module`), torch.compile (`._orig_mod`) and peft."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def enable_chunked_loss(model: nn.Module, chunk_size: int | None = None) -> None:
    """Make `next_token_loss` compute the loss chunk by chunk from the model's final hidden states.

    Turns the model's output embedding (`get_output_embeddings()`, an `nn.Linear`) into a `ChunkedLossHead`
    in place: same module, same parameters. Call it before `accelerate.prepare` (FSDP2 and DeepSpeed wrap
    the module afterwards, which keeps it working) and before peft, or on the peft model. Refuses, with a
    `UserError`, an output layer that is not a plain `nn.Linear`. It does not check that the model leaves its
    logits alone after that layer (soft-capping, scaling): `finetune.lm.probes.enable_exact_chunked_loss` does,
    by running a tiny instance of the model's class, and is what recipes call.
    """
    base = unwrap(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise UserError(f"train.chunked_loss: {type(base).__name__} has no output embedding (lm_head) to compute from")
    if isinstance(head, ChunkedLossHead):
        head.chunk_size = chunk_size
        return
    if type(head) is not nn.Linear:
        raise UserError(
            f"train.chunked_loss: the output layer of {type(base).__name__} is a {type(head).__name__}, not a plain "
            "torch.nn.Linear (LoRA or modules_to_save on lm_head, quantization, or an already wrapped model: enable "
            "it before accelerator.prepare); turn train.chunked_loss off"
        )
    chunk_output_layer(base, chunk_size)


def chunk_output_layer(model: nn.Module, chunk_size: int | None = None) -> ChunkedLossHead:
    """Turn the model's plain `nn.Linear` output layer into a ChunkedLossHead in place, unchecked: what
    `enable_chunked_loss` does once its checks pass (and the chunked-loss probe does on its tiny model)."""
    head = unwrap(model).get_output_embeddings()
    head.__class__ = ChunkedLossHead
    head.chunk_size = chunk_size
    return head


def disable_chunked_loss(model: nn.Module) -> None:
    """Undo `enable_chunked_loss`: the output layer is a plain `nn.Linear` again."""
    head = find_chunked_head(model)
    if head is not None and type(head) is ChunkedLossHead:
        head.__class__ = nn.Linear
        vars(head).pop("chunk_size", None)


def find_chunked_head(model: nn.Module) -> ChunkedLossHead | None:
    """The ChunkedLossHead inside `model` (through any wrapper), or None."""
    return next((m for m in model.modules() if isinstance(m, ChunkedLossHead)), None)


def next_token_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The summed next-token loss of a batch (input_ids, labels, and attention_mask and/or position_ids).

    With the chunked loss enabled the output layer returns the loss and no logits exist; otherwise it is
    `summed_next_token_loss(model(**inputs).logits, labels)`. The model runs with `use_cache=False`: a
    cache is useless in training, and with one transformers does not detect packed rows (see
    `check_packing_supported`).
    """
    labels = batch["labels"]
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    inputs["use_cache"] = False
    head = find_chunked_head(model)
    if head is None:
        return summed_next_token_loss(model(**inputs).logits, labels)
    with head.targets(labels):
        logits = model(**inputs).logits
        if head._targets is not None:
            raise RuntimeError("the model's forward never called its output layer; the chunked loss got no input")
    if logits.shape != (1, 1, 1):
        raise RuntimeError(f"the model changed the chunked loss on its way out (got shape {tuple(logits.shape)})")
    return logits.reshape(())
