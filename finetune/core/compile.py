"""`train.compile=true`: torch.compile with static shapes.

A compiled model is specialised to the shapes it has seen (`dynamic=False`): every new (rows, length) shape
compiles a new graph, and past dynamo's recompile limit the model silently runs eagerly. So the collators pad
batches to a few lengths (`finetune.core.buckets.LengthBuckets`), and the recompile limit is raised to fit every
bucket of every loader. `compiled_graphs()` counts the graphs so far; the training log reports it
(`compiled_graphs`).
"""

from __future__ import annotations

from finetune.core.buckets import LengthBuckets


def dynamo_plugin(train):
    """Accelerate's TorchDynamoPlugin for `train` (a TrainConfig), or None when train.compile is off."""
    if not train.compile:
        return None
    from accelerate.utils import TorchDynamoPlugin

    mode = None if train.compile_mode == "default" else train.compile_mode
    return TorchDynamoPlugin(backend=train.compile_backend, mode=mode, dynamic=False)


def allow_recompiles(buckets: LengthBuckets, loaders: int = 2) -> None:
    """Raise dynamo's recompile limit so that every bucket of every loader (train, eval) gets its graph: past
    the limit (8 by default) dynamo would run the model eagerly without a word."""
    import torch._dynamo

    needed = buckets.shapes * loaders + 2
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def batch_collators(make_collate, compile: bool, max_length: int, *batch_sizes: int) -> list:
    """One collator per loader batch size (train, eval): `make_collate(buckets)` with static-shape buckets when
    the model is compiled (dynamo's recompile limit raised to fit them all), `make_collate(None)` otherwise."""
    if not compile:
        return [make_collate(None) for _ in batch_sizes]
    buckets = [LengthBuckets.up_to(max_length, size) for size in batch_sizes]
    allow_recompiles(buckets[0], loaders=len(buckets))
    return [make_collate(b) for b in buckets]
