"""The sync plan: which trainer tensor goes, under which engine name, into which bucket at which offset. Built once
per (model, engine dtype, bucket size) and reused at every sync, so names are mapped once, not per step.

Order. Tensors are sent in `model.state_dict()` order, each tied tensor once (under its first name). They form
**groups**: contiguous runs of one transformer block (`model.layers.N`), or of the modules around the blocks
(`model.embed_tokens`; `model.norm, lm_head`). A group is the unit of the gather (one collective per group under
FSDP2, not one per parameter) and the name the parity probe reports.

Buckets. Each tensor takes `nbytes` rounded up to `BUCKET_ALIGN` at the next free offset of the current bucket; a
bucket closes when the next tensor would pass `bucket_bytes`. A tensor larger than `bucket_bytes` is sent alone in
a bucket of its own size rather than split: every receiver (vLLM's loaders included) needs whole tensors, so a
split would be reassembled at the other end, and the gathered full tensor exists on the sender anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from npo_engine.rollout.base import BUCKET_ALIGN, BucketEntry

# Prefix that activation checkpointing inserts into parameter names; engines expect Hugging Face names.
_CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
# A transformer block's parameters share this prefix (HF Llama/Qwen/Mistral: model.layers.N.).
_BLOCK = re.compile(r"^(.*?\blayers\.\d+)\.")


def hf_name(name: str) -> str:
    return name.replace(_CHECKPOINT_WRAPPER_PREFIX, "")


def _module_path(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class Slot:
    """One tensor of the trainer's state dict and its place in the buckets."""

    key: str
    """The trainer's state-dict key (what `model.state_dict()` calls it, wrapper prefixes included)."""
    entry: BucketEntry
    """Engine name, offset inside its bucket, full shape, engine dtype."""
    bucket: int
    position: int
    """Index of this tensor among its bucket's entries."""
    group: int


@dataclass(frozen=True)
class Group:
    name: str
    slots: tuple[int, ...]
    """Indices into `SyncPlan.slots`, in send order."""


@dataclass(frozen=True)
class BucketLayout:
    nbytes: int
    """The bucket's size: its last entry's end rounded up to `BUCKET_ALIGN`."""
    entries: tuple[BucketEntry, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class SyncPlan:
    slots: tuple[Slot, ...]
    groups: tuple[Group, ...]
    buckets: tuple[BucketLayout, ...]
    dtype: torch.dtype | None
    bucket_bytes: int
    signature: tuple
    """What the plan was built from (names, shapes, dtypes): a model whose signature differs needs a new plan."""

    @property
    def total_bytes(self) -> int:
        return sum(s.entry.nbytes for s in self.slots)

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def group_of(self, engine_name: str) -> str:
        for slot in self.slots:
            if slot.entry.name == engine_name:
                return self.groups[slot.group].name
        raise KeyError(engine_name)


def unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(state-dict key, tensor) of `model`, each storage once (tied weights under their first name)."""
    seen: set[int] = set()
    out = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((key, tensor))
    return out


def model_signature(state: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((key, tuple(t.shape), t.dtype) for key, t in state)


def _align(n: int) -> int:
    return -(-n // BUCKET_ALIGN) * BUCKET_ALIGN


def _group_key(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else "~"  # "~": a module around the blocks


def build_plan(model: nn.Module, *, dtype: torch.dtype | None, bucket_bytes: int) -> SyncPlan:
    """The plan for `model` (see the module docstring). `dtype` is the engine's: floating tensors are sent in
    it, others as they are; None keeps every tensor's dtype."""
    if bucket_bytes < BUCKET_ALIGN:
        raise ValueError(f"bucket_bytes must be >= {BUCKET_ALIGN}, got {bucket_bytes}")
    state = unique_state(model)
    slots: list[Slot] = []
    groups: list[Group] = []
    buckets: list[BucketLayout] = []
    run_key, run_slots, run_modules = None, [], []
    current: list[int] = []
    cursor = 0

    def close_group() -> None:
        if run_slots:
            name = run_key if run_key != "~" else ", ".join(dict.fromkeys(run_modules))
            groups.append(Group(name, tuple(run_slots)))

    def close_bucket() -> None:
        nonlocal current, cursor
        if current:
            entries = tuple(slots[i].entry for i in current)
            buckets.append(BucketLayout(_align(cursor), entries, tuple(current)))
        current, cursor = [], 0

    for key, tensor in state:
        name = hf_name(key)
        send_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        shape = tuple(int(s) for s in tensor.shape)
        entry_bytes = BucketEntry(name, 0, shape, send_dtype).nbytes
        if current and cursor + entry_bytes > bucket_bytes:
            close_bucket()
        gkey = _group_key(name)
        if gkey != run_key:
            close_group()
            run_key, run_slots, run_modules = gkey, [], []
        entry = BucketEntry(name, cursor, shape, send_dtype)
        slots.append(Slot(key, entry, len(buckets), len(current), len(groups)))
        run_slots.append(len(slots) - 1)
        run_modules.append(_module_path(name))
        current.append(len(slots) - 1)
        cursor = _align(cursor + entry_bytes)
        if cursor >= bucket_bytes:  # a full bucket (or a tensor larger than one, sent alone)
            close_bucket()
    close_group()
    close_bucket()
    return SyncPlan(tuple(slots), tuple(groups), tuple(buckets), dtype, bucket_bytes, model_signature(state))
