"""Process group and FSDP2 wrapping, applied from outside the model.

One process per device under torchrun (gloo on CPU, NCCL on CUDA), or a single process with no process group
at all. The training loop never branches on world size: `Dist` answers rank/world-size questions and the
collectives below are no-ops for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def init_distributed() -> Dist:
    """Join the torchrun process group if launched by torchrun; otherwise run as a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # NCCL for CUDA tensors, gloo for the small CPU tensors and objects of metrics and bookkeeping (NCCL
        # has no CPU path: a CPU all_reduce on an NCCL-only group fails with "No backend type ...").
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (`model.model.layers` for Llama/Qwen)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__} (expected model.model.layers); "
            "FSDP2 wrapping and activation checkpointing need them"
        )
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward pass (non-reentrant checkpointing, wraps from outside)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as wrap

    blocks = set(map(id, decoder_layers(model)))
    wrap(model, check_fn=lambda module: id(module) in blocks)


def shard_model(model: nn.Module, blocks: list[nn.Module], d: Dist, *, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: `fully_shard` each of `blocks` (the decoder layers inside `model`), then the root `model`, which
    keeps the embeddings, final norm and LM head (tied or not) in one group.

    `param_dtype` enables mixed precision (e.g. bf16 compute, fp32 master weights and gradient reduction).
    Single process: the model is returned unchanged.
    """
    if not d.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a (small) tensor over ranks; identity for a single process."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise max of a (small) tensor over ranks; identity for a single process."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_objects(obj):
    """Gather one picklable object per rank (a list in rank order); [obj] for a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
