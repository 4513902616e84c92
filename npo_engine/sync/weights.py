"""Gather full weights from the trainer and load them into a rollout engine (see the package docstring)."""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import nn

from npo_engine.rollout.base import RolloutEngine

# Prefix that activation checkpointing inserts into parameter names; engines expect Hugging Face names.
_CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def hf_name(name: str) -> str:
    return name.replace(_CHECKPOINT_WRAPPER_PREFIX, "")


def iter_full_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, full tensor) for every parameter and persistent buffer of `model`.

    Sharded parameters (DTensor) are all-gathered, so every rank must iterate the same model in the same order.
    Tied parameters are yielded once, under their first name.
    """
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            # Cast before the gather where we can: half the bytes on the wire for bf16 engines.
            tensor = tensor.to(dtype)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield hf_name(name), tensor


def push_weights(model: nn.Module, engine: RolloutEngine, *, dtype: torch.dtype | None = None,
                 bucket_bytes: int = 256 * 2**20) -> dict[str, float]:
    """Load the trainer's current weights into `engine`, in buckets of about `bucket_bytes`.

    Returns `{"time/sync": seconds, "sync/bytes": bytes}`.
    """
    start = time.perf_counter()
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_size = total = 0
    for name, tensor in iter_full_weights(model, dtype):
        bucket.append((name, tensor))
        size = tensor.numel() * tensor.element_size()
        bucket_size += size
        total += size
        if bucket_size >= bucket_bytes:
            engine.update_weights(bucket)
            bucket, bucket_size = [], 0
    if bucket:
        engine.update_weights(bucket)
    return {"time/sync": time.perf_counter() - start, "sync/bytes": float(total)}


def fingerprint(named_tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> float:
    """An order-independent float64 checksum of named tensors, to check that two copies of weights agree.

    Each tensor contributes sum(values * (1 + position / numel)), so permuted or shifted values change it.
    """
    items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
    total = 0.0
    for _, tensor in items:
        flat = tensor.detach().reshape(-1).to(torch.float64).cpu()
        weights = 1.0 + torch.arange(flat.numel(), dtype=torch.float64) / max(flat.numel(), 1)
        total += float((flat * weights).sum())
    return total
