"""Peak memory of a training run, per process, from the model's config alone: no weights read, no memory used.

Parameters are counted on the model built on the meta device, with gradient checkpointing, LoRA and the chunked
loss applied as the recipes apply them. One micro-batch's forward and backward then run on fake tensors
(`FakeTensorMode`: shapes, dtypes and storages, no data, no compute) through the recipes' own loss functions, with
an attention mask as padded or packed batches carry, while a dispatch mode adds up the bytes of every storage alive
after each operation: what an allocator without a cache holds, i.e. the activations saved for backward, the loss's
logits, the gradients as they appear, each operation's outputs and temporaries. Mixed precision runs under CPU
autocast, wrapped around the forward as Accelerate wraps it (its half-precision weight copies included). The peak
is the weights and optimizer state plus the larger of that forward/backward peak and the optimizer step's (every
gradient). Measured training steps on CPU agree within 1% (tests/unit/test_memory_estimate.py); the GPU check is
benchmarks/gpu_memory_estimate.py.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune.core.modeling import apply_lora, lora_follows_autocast
from finetune.core.optim import NO_DECAY
from finetune.core.precision import WEIGHT_DTYPES
from finetune.lm import loss as lm_loss
from finetune.training.accumulation import summed_classification_loss

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Whether weights, gradients and optimizer state are divided among the processes.
SPLITS = {"none": (0, 0, 0), "zero1": (0, 0, 1), "zero2": (0, 1, 1), "zero3": (1, 1, 1), "fsdp": (1, 1, 1)}
SHARDINGS = tuple(SPLITS)
DEVICE_NOTES = {
    "cuda": "what torch.cuda.max_memory_allocated reports: the CUDA context and the allocator's cache come on top",
    "cpu": "the growth of peak RSS: the process's libraries come on top",
}
# The rough rule for a model whose forward fake tensors cannot run: activations per token and layer, in elements
# (LLaMA and BERT layers hold ~11 x hidden + 3 x intermediate), and the plain loss's bytes per token and vocabulary
# entry (fp32 logits, their log-softmax and its gradient).
FALLBACK_HIDDEN, FALLBACK_INTERMEDIATE, FALLBACK_LOGIT_BYTES = 11, 3, 12
# bitsandbytes' block sizes: 4-bit weights (64 per absmax; 256 absmaxes per second-level one with double
# quantization), and 8-bit optimizer states (256), which tensors under 4,096 elements do without (fp32 states).
BLOCK_4BIT, BLOCK_NESTED, BLOCK_8BIT_OPTIMIZER, MIN_8BIT_SIZE = 64, 256, 256, 4096


@dataclass
class MemoryEstimate:
    """Bytes per process of each part of a training step, and the peak they add up to."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # held by autograd when the forward reaches the output layer (or ends)
    logits: int  # the output layer and the loss on top of that, until backward is through them
    total_params: int
    trainable_params: int
    notes: list[str] = field(default_factory=list)  # assumptions stated to the user
    forward_backward: int | None = None  # simulated peak of forward + backward; None: activations + logits
    step_transient: int = 0  # what the optimizer step allocates for a moment
    buffers: int = 0  # held throughout: DDP's gradient buckets
    reference: int = 0  # held throughout: DPO's frozen reference copy (dpo.reference=model)

    @property
    def peak(self) -> int:
        """Weights, optimizer state and buffers throughout, plus the larger of the forward/backward's peak (which
        includes the gradients as backward makes them) and the optimizer step's (every gradient)."""
        compute = self.activations + self.logits if self.forward_backward is None else self.forward_backward
        held = self.weights + self.reference + self.optimizer + self.buffers
        return held + max(compute, self.gradients + self.step_transient)

    def describe(self) -> str:
        rows = [("weights", self.weights)] + ([("reference model", self.reference)] if self.reference else [])
        rows += [("gradients", self.gradients), ("optimizer state", self.optimizer)]
        rows += [("DDP buckets", self.buffers)] if self.buffers else []
        rows += [("activations", self.activations), ("loss logits", self.logits)]
        rows += [("forward+backward", self.forward_backward)] if self.forward_backward is not None else []
        lines = [f"memory per process: {self.total_params:,} parameters, {self.trainable_params:,} trainable"]
        lines += [f"  {name:<18}{_human(size):>11}" for name, size in [*rows, ("peak", self.peak)]]
        return "\n".join(lines + [f"  - {note}" for note in self.notes])


def _human(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _task_type(auto_class) -> str:
    return "CAUSAL_LM" if "CausalLM" in auto_class.__name__ else "SEQ_CLS"


def build_meta_model(
    model_config, auto_class, lora=None, task_type=None, *, dtype=torch.float32, gradient_checkpointing=False
):
    """The model built from its transformers config on the meta device (no memory, no weights read), LoRA applied
    through finetune.core.modeling.apply_lora when lora.enabled: used to count parameters and trainable parameters."""
    with torch.device("meta"):
        model = auto_class.from_config(model_config, dtype=dtype)
    if gradient_checkpointing:  # as the recipes: before LoRA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it; the recipes call this name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, task_type or _task_type(auto_class))
    return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft


def _fake_parameters(model: torch.nn.Module) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor (inside the active FakeTensorMode), ties kept."""
    swapped: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in [(n, t) for n, t in table.items() if t is not None]:
                if id(t) not in swapped:
                    fake = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    swapped[id(t)] = torch.nn.Parameter(fake, t.requires_grad) if is_param else fake
                table[name] = swapped[id(t)]


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive after each operation (as an allocator without a cache holds them), and their peak
    overall and since `window` was last set."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes = {t.untyped_storage()._cdata: 0 for t in known}  # weights and buffers: counted apart
        self.live = self.peak = self.window = 0

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def _high(self, size: int) -> None:
        self.peak, self.window = max(self.peak, size), max(self.window, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.logsumexp.default:  # its kernel holds `input - max` for a moment (CPU and CUDA)
            self._high(self.live + args[0].nbytes)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (storage := t.untyped_storage())._cdata not in self.sizes:
                self.sizes[storage._cdata] = storage.nbytes()
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage._cdata).atexit = False  # fires when the storage dies
        self._high(self.live)
        return out


def _fake_chunked_loss(tokens: int):
    """lm_loss.chunked_next_token_loss for fake tensors: `tokens` positions carry a target, gathered by index
    instead of by a boolean mask (whose count fake tensors cannot know); then the same chunks."""

    def loss(hidden_states, weight, labels, bias=None, chunk_size=None, recompute=None):
        rows = torch.zeros(tokens, dtype=torch.long)
        hidden = hidden_states[..., :-1, :][rows, rows]
        return lm_loss.chunked_linear_cross_entropy(hidden, weight, rows, bias, chunk_size, recompute)

    return loss


def _numel(shape) -> int:
    return math.prod(shape)


def quantized_layers(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """{name: (weight shape, bytes per element before quantization)} of the linear layers bitsandbytes quantizes."""
    from finetune.core.quantization import quantizable_linears

    return {
        name: (tuple(model.get_submodule(name).weight.shape), model.get_submodule(name).weight.element_size())
        for name in quantizable_linears(model)
    }


def quantized_bytes(shape, quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for a quantized weight of `shape`, with its quantization constants.

    4-bit: two weights per byte, one absmax per block of 64 (fp32; double quantization: uint8, plus an fp32 absmax
    per 256 of them). int8: one byte per weight and an fp32 scale per output row."""
    numel = _numel(shape)
    if quantization == "int8":
        return numel + 4 * shape[0]
    blocks = -(-numel // BLOCK_4BIT)
    constants = blocks + 4 * -(-blocks // BLOCK_NESTED) if double_quant else 4 * blocks
    return -(-numel // 2) + constants


def optimizer_state_bytes(optimizer: str, trainable) -> tuple[int, str]:
    """Bytes of the optimizer's state for the trainable (name, parameter) pairs, and what was assumed."""
    sizes = [(p.numel(), p.element_size()) for _, p in trainable]
    if optimizer == "sgd":
        return 0, "SGD: no state"
    if optimizer == "adamw":  # exp_avg and exp_avg_sq, in the weights' dtype
        return sum(2 * n * size for n, size in sizes), "fused AdamW: 2 states per trainable weight, stepped in place"
    # bitsandbytes: two uint8 states and an fp32 absmax per block of 256 each; small tensors keep fp32 states
    eight_bit = sum(2 * (n + 4 * -(-n // BLOCK_8BIT_OPTIMIZER)) for n, _ in sizes if n >= MIN_8BIT_SIZE)
    small = sum(2 * 4 * n for n, _ in sizes if n < MIN_8BIT_SIZE)
    paged = ", paged (CUDA unified memory: counted as resident)" if optimizer.startswith("paged") else ""
    return eight_bit + small, f"8-bit AdamW (bitsandbytes): 2 uint8 states per weight{paged}"


def _offload_hooks(offloaded: list[int]):
    """saved_tensors_hooks as `finetune.core.offload` offloads: a saved activation leaves (its bytes counted in
    `offloaded`), and comes back as a new tensor when backward unpacks it."""
    from finetune.core.offload import MIN_OFFLOAD_BYTES

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter) or size < MIN_OFFLOAD_BYTES:
            return tensor
        offloaded[0] += size
        return (tensor.shape, tensor.dtype, tensor.stride())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        shape, dtype, stride = packed
        return torch.empty_strided(shape, stride, dtype=dtype)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _plain_module_name(name: str) -> str:
    """A module's name in the plain model, from its name inside a peft model."""
    return name.removeprefix("base_model.model.").removesuffix(".base_layer")


def _simulate(
    model,
    causal: bool,
    batch: int,
    seq_len: int,
    tokens: int,
    autocast,
    micro_batches: int,
    sharded,
    offloaded=None,
    inputs_kept_by=(),
):
    """(forward/backward peak, activations, logits) in bytes, from micro-batches run on fake tensors;
    `offloaded` (a one-item list) turns activation offload on and receives the bytes offloaded per micro-batch;
    the modules `inputs_kept_by` hold their input until backward is through."""
    from accelerate.utils import convert_outputs_to_fp32
    from torch._subclasses.fake_tensor import FakeTensorMode

    head = _base(model).get_output_embeddings() if causal else None
    marks: dict[str, int] = {}
    patch = mock.patch.object(lm_loss, "chunked_next_token_loss", _fake_chunked_loss(tokens))
    with FakeTensorMode(), patch, torch.enable_grad():
        _fake_parameters(model)
        model.train()
        if autocast is not None:  # as Accelerate's prepare does
            model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=autocast)(model.forward))
        if sharded:  # ZeRO-2/3, FSDP: each gradient is reduce-scattered (and freed) as soon as it is complete
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        tracker = _LiveBytes([*model.parameters(), *model.buffers()])

        def head_exit(grad) -> None:  # the head's input has its gradient: backward is through the loss and the head
            marks.setdefault("logits", tracker.window - marks["activations"])

        def head_entry(module, args) -> None:
            marks.setdefault("activations", tracker.live)
            tracker.window = tracker.live
            if args[0].requires_grad:
                args[0].register_hook(head_exit)

        hook = head.register_forward_pre_hook(head_entry) if head is not None else None
        kept: list[torch.Tensor] = []
        keep_hooks = [
            m.register_forward_hook(lambda m, args, out: kept.append(args[0]) if args[0].requires_grad else None)
            for m in inputs_kept_by
        ]
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        # Fake ones could be padding: transformers builds the attention mask that padded (or packed) batches get.
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with tracker:
            for _ in range(micro_batches):  # a second one runs with the first one's gradients held
                if offloaded is not None:
                    offloaded[0] = 0
                with _offload_hooks(offloaded) if offloaded is not None else contextlib.nullcontext():
                    if causal:
                        loss = lm_loss.next_token_loss(model, {**inputs, "labels": ids})
                    else:
                        labels = torch.zeros(batch, dtype=torch.float32 if model.config.num_labels == 1 else torch.long)
                        loss = summed_classification_loss(model(**inputs).logits, labels)
                        marks.setdefault("activations", tracker.live)
                loss.backward()
                del loss
                kept.clear()
        if hook is not None:
            hook.remove()
        for keep_hook in keep_hooks:
            keep_hook.remove()
    return tracker.peak, marks.get("activations", 0), marks.get("logits", 0)


def _analytic(config, batch: int, seq_len: int, causal: bool, half: bool, checkpointing: bool) -> tuple[int, int]:
    """(activations, logits) from the config by a rough per-layer rule, for when the fake forward fails."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    tokens = batch * seq_len
    layer = tokens * (FALLBACK_HIDDEN * hidden + FALLBACK_INTERMEDIATE * inner) * (2 if half else 4)
    activations = layers * tokens * hidden * 4 + layer if checkpointing else layers * layer  # inputs + 1 recomputed
    return activations, FALLBACK_LOGIT_BYTES * tokens * getattr(text, "vocab_size", 0) if causal else 0


def estimate_memory(
    model_config,
    auto_class,
    *,
    micro_batch_size: int,
    seq_len: int,
    weights_dtype: str = "fp32",
    mixed_precision: str | None = "no",
    optimizer: str = "adamw",
    lora=None,
    gradient_checkpointing=False,
    chunked_loss: bool = False,
    loss_tokens: int | None = None,
    num_processes: int = 1,
    sharding: str = "none",
    device_type: str = "cuda",
    gradient_accumulation_steps: int = 1,
    quantization: str | None = None,
    double_quant: bool = True,
    activation_offload: bool = False,
) -> MemoryEstimate:
    """Peak memory per process of training `auto_class` built from `model_config` (see the module docstring).

    `loss_tokens`: target tokens per micro-batch (the chunked loss drops the others); default all of them.
    `gradient_accumulation_steps` > 1: the micro-batches after the first run beside the gradients.
    `quantization` (nf4, fp4, int8): the base's linear layers held quantized, the other frozen weights in the compute
    dtype (`finetune.core.quantization`); `activation_offload`: the large saved activations held in host memory.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    causal = _task_type(auto_class) == "CAUSAL_LM"
    dtype = WEIGHT_DTYPES[weights_dtype]
    if quantization is not None:  # the frozen weights load in the compute dtype, the trained ones stay in `dtype`
        from finetune.core.quantization import compute_dtype

        frozen_dtype = compute_dtype(mixed_precision, weights_dtype)
        model = build_meta_model(model_config, auto_class, dtype=frozen_dtype)
        quantized = quantized_layers(model)
        model = build_meta_model(
            model_config, auto_class, lora, dtype=frozen_dtype, gradient_checkpointing=gradient_checkpointing
        )
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    else:
        quantized = {}
        model = build_meta_model(
            model_config, auto_class, lora, dtype=dtype, gradient_checkpointing=gradient_checkpointing
        )
    if lora is not None and lora.enabled and HALF.get(mixed_precision or "no") is not None:
        lora_follows_autocast(model)  # as finetune.training.batches.prepare_model
    if causal and chunked_loss:
        lm_loss.enable_chunked_loss(model)
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for _, p in named)
    notes = []
    if quantized:
        held = sum(quantized_bytes(shape, quantization, double_quant) for shape, _ in quantized.values())
        weights += held - sum(_numel(shape) * itemsize for shape, itemsize in quantized.values())
        constants = "double-quantized constants" if double_quant and quantization != "int8" else "constants"
        notes.append(
            f"{quantization} base: {len(quantized)} linear layers in {_human(held)} with their {constants}; the "
            "other frozen weights in the compute dtype; one layer dequantized at a time"
        )
    gradients = sum(p.numel() * p.element_size() for _, p in trainable)
    optim, optimizer_note = optimizer_state_bytes(optimizer, trainable)
    notes.append(optimizer_note)
    transient = 0
    decayed = [p.numel() * p.element_size() for n, p in trainable if not any(s in n for s in NO_DECAY)]
    eight_bit = [p.numel() for _, p in trainable if p.numel() >= MIN_8BIT_SIZE]
    if optimizer in ("adamw_8bit", "paged_adamw_8bit") and device_type == "cpu" and eight_bit:
        # bitsandbytes' CPU step dequantizes a tensor's two states to fp32 and adds an fp32 gradient, a square root
        # and the denominator beside them, tensor by tensor (its CUDA kernel updates in place)
        transient = 5 * 4 * max(eight_bit)
    if optimizer == "sgd" and decayed:  # grad + weight_decay * weight, out of place: all at once with foreach (CUDA)
        transient = sum(decayed) if device_type == "cuda" else max(decayed)

    autocast = HALF.get(mixed_precision or "no")
    tokens = min(loss_tokens or micro_batch_size * (seq_len - 1), micro_batch_size * (seq_len - 1))
    sharded = num_processes > 1 and sharding in ("zero2", "zero3", "fsdp")
    offloaded = [0]
    # LLM.int8 layers keep their input for backward (bitsandbytes' MatMul8bitLt), which a frozen linear layer need not
    int8_layers = [
        m
        for n, m in model.named_modules()
        if quantization == "int8" and isinstance(m, torch.nn.Linear) and _plain_module_name(n) in quantized
    ]
    try:
        micro = min(gradient_accumulation_steps, 2)
        fb, activations, logits = _simulate(
            model,
            causal,
            micro_batch_size,
            seq_len,
            tokens,
            autocast,
            micro,
            sharded,
            offloaded if activation_offload else None,
            int8_layers,
        )
    except Exception as err:  # noqa: BLE001  (model code fake tensors cannot run, e.g. data-dependent shapes)
        half = autocast is not None or weights_dtype == "bf16"
        fb, (activations, logits) = (
            None,
            _analytic(model_config, micro_batch_size, seq_len, causal, half, gradient_checkpointing),
        )
        notes.append(f"the forward failed on fake tensors ({type(err).__name__}): activations by a rough rule")
    if autocast is not None:
        notes.append(f"{mixed_precision} autocast: activations include the weights' half-precision copies")
    if quantized and fb is not None:  # a quantized layer computes with its weight dequantized, one layer at a time
        fb += max(_numel(shape) for shape, _ in quantized.values()) * frozen_dtype.itemsize
        if quantization == "int8":  # LLM.int8 also quantizes the layer's input (int8) and accumulates in int32
            rows = micro_batch_size * seq_len
            fb += max(rows * (shape[1] + 4 * shape[0]) for shape, _ in quantized.values())
    if activation_offload:
        notes.append(f"activation offload: {_human(offloaded[0])} of saved activations wait in pinned host memory")

    buffers = 0
    if num_processes > 1:
        w, g, o = (num_processes if divided else 1 for divided in SPLITS[sharding])
        if w > 1:  # a layer's weights are gathered whole while the next one is prefetched
            layers = [m for m in _base(model).modules() if isinstance(m, GradientCheckpointingLayer)]
            gathered = 2 * max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
            weights = weights // w + gathered * (2 if autocast is not None else dtype.itemsize)
        gradients, optim = gradients // g, optim // o
        if sharded and fb is not None:
            fb += gradients  # simulated without them: they stay, sharded, until the step
        if sharding == "none":  # Accelerate's DDP: gradient_as_bucket_view=False, so buckets copy every gradient
            buffers = gradients
        notes.append(
            f"{'DDP' if sharding == 'none' else sharding} over {num_processes} processes: weights / {w}, "
            f"gradients / {g}, optimizer state / {o}" + (", 2 layers gathered at a time" if w > 1 else "")
        )
        if "zero" in sharding:
            notes.append("DeepSpeed's fp32 master weights (mixed precision) and communication buckets are not counted")
    if device_type in DEVICE_NOTES:
        notes.append(DEVICE_NOTES[device_type])
    total, trained = sum(p.numel() for _, p in named), sum(p.numel() for _, p in trainable)
    return MemoryEstimate(weights, gradients, optim, activations, logits, total, trained, notes, fb, transient, buffers)
