"""Activation offload: the tensors autograd saves for backward wait in pinned host memory instead of GPU memory.

`torch.autograd.graph.save_on_cpu` does this, but copies everything, weights included, and synchronously. Here (as
torchtune's and TRL's offloading does) parameters and small tensors stay where they are, and the copies are
asynchronous on the current stream: the device-to-host copy is ordered before any later kernel that reuses the
freed memory, and the host-to-device copy in backward before the kernel that reads it. With gradient checkpointing
the saved tensors are the checkpointed layers' inputs, which then leave the GPU as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Smaller saved tensors stay on the device: their copies would cost more time than they free memory.
MIN_OFFLOAD_BYTES = 1 << 20


def offloadable(tensor: torch.Tensor) -> bool:
    """Whether a saved tensor goes to host memory: a large activation on a GPU, not a weight."""
    return (
        tensor.device.type == "cuda"
        and not isinstance(tensor, torch.nn.Parameter)
        and tensor.numel() * tensor.element_size() >= MIN_OFFLOAD_BYTES
    )


def _pack(tensor: torch.Tensor):
    if not offloadable(tensor):
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return tensor.device, host


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def offloaded_activations() -> torch.autograd.graph.saved_tensors_hooks:
    """A context: what the forward inside it saves for backward goes to pinned host memory (`offloadable`)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def with_activation_offload(loss_fn: Callable) -> Callable:
    """`loss_fn(model, batch)` with its forward's saved activations offloaded (the backward that follows reads them
    back: the hooks travel with each saved tensor)."""

    def offloaded_loss(model, batch):
        with offloaded_activations():
            return loss_fn(model, batch)

    offloaded_loss.__name__ = getattr(loss_fn, "__name__", "loss")
    return offloaded_loss
