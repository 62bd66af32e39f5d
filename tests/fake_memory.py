"""A fake device allocator for CPU tests: a memory budget that counts what a GPU would hold.

It counts the bytes of the registered model's parameters, their gradients, the registered optimizers'
state and the activations autograd saves for backward (while they are alive), and raises PyTorch's
out-of-memory error whenever the total goes over the budget: at each saved activation (forward), each
gradient accumulated (backward) and after each optimizer step. `fail_at` injects one out-of-memory error
in the N-th training forward or backward, as fragmentation does in the middle of a real run.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch


class _Saved:
    """A tensor saved for backward; counts as memory until autograd releases it."""

    def __init__(self, meter: FakeMemory, tensor: torch.Tensor):
        # Detached: an op's saved output would otherwise hold its own graph node in a cycle gc cannot see.
        self.meter, self.tensor, self.nbytes = meter, tensor.detach(), tensor.nbytes
        meter.activations += self.nbytes
        meter.check()

    def __del__(self):
        self.meter.activations -= self.nbytes


class FakeMemory:
    """Also a drop-in for `finetune.core.memory.DeviceMemory` (peak, limit, reset_peak)."""

    def __init__(self, budget: float = float("inf")):
        self.budget = budget
        self.models: list[torch.nn.Module] = []
        self.optimizers: weakref.WeakSet = weakref.WeakSet()
        self.activations = 0
        self.peak_bytes = self.run_peak = 0
        self.forwards = self.backwards = 0
        self.fail_at: dict[str, set[int]] = {"forward": set(), "backward": set()}
        self.injected = 0

    # -- what is held
    def held(self) -> int:
        params = [p for model in self.models for p in model.parameters()]
        weights = sum(p.nbytes for p in params)
        grads = sum(p.grad.nbytes for p in params if p.grad is not None)
        state = sum(
            t.nbytes
            for optimizer in self.optimizers
            for s in getattr(optimizer, "optimizer", optimizer).state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        return weights + grads + state + self.activations

    def check(self) -> None:
        total = self.held()
        if total > self.budget:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to hold {total} bytes of {self.budget} (fake)")
        self.peak_bytes, self.run_peak = max(self.peak_bytes, total), max(self.run_peak, total)

    # -- DeviceMemory's interface
    def reset_peak(self) -> None:
        self.peak_bytes = 0

    def peak(self) -> int:
        return self.peak_bytes

    def limit(self) -> float:
        return self.budget

    # -- registering what to count
    def add_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.models.append(model)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda param: self._on_grad())
        model.register_forward_pre_hook(lambda module, args: self._on_forward(module))
        return model

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizers.add(optimizer)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.check())
        return optimizer

    def _on_forward(self, module: torch.nn.Module) -> None:
        if module.training and torch.is_grad_enabled():
            self.forwards += 1
            self._inject("forward", self.forwards)
            self._backward_pending = True

    def _on_grad(self) -> None:
        if getattr(self, "_backward_pending", False):  # the first gradient of a backward pass
            self._backward_pending = False
            self.backwards += 1
            self._inject("backward", self.backwards)
        self.check()

    def _inject(self, kind: str, count: int) -> None:
        if count in self.fail_at[kind]:
            self.fail_at[kind].discard(count)
            self.injected += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory in {kind} #{count} (injected)")

    # -- activations
    @contextmanager
    def counting(self):
        """Count saved activations while inside (parameters saved for backward are weights, not activations)."""

        def pack(tensor: torch.Tensor):
            if any(tensor.data_ptr() == p.data_ptr() for m in self.models for p in m.parameters()):
                return tensor
            return _Saved(self, tensor)

        def unpack(saved):
            return saved.tensor if isinstance(saved, _Saved) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield self


@contextmanager
def fake_device_memory(monkeypatch, budget: float = float("inf")):
    """Run a recipe in-process under a FakeMemory: its model and optimizer counted, `auto` measuring it. (The recipe
    is loaded inside: `helpers.recipe_main` executes it afresh, so it finds the patched functions.)"""
    import finetune.classify.model
    import finetune.core.geometry
    import finetune.core.optim

    meter = FakeMemory(budget)
    load, build = finetune.classify.model.load_classifier, finetune.core.optim.build_optimizer
    monkeypatch.setattr(finetune.classify.model, "load_classifier", lambda *a, **k: meter.add_model(load(*a, **k)))
    monkeypatch.setattr(finetune.core.optim, "build_optimizer", lambda *a, **k: meter.add_optimizer(build(*a, **k)))
    monkeypatch.setattr(finetune.core.geometry, "DeviceMemory", lambda device: meter)
    with meter.counting():
        yield meter
