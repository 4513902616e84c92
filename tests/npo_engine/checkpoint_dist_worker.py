"""Worker for test_checkpoint.py::test_fsdp2_two_ranks: `torchrun --nproc_per_node=2 <this> <out_dir>`.

Trains a tiny Qwen2 sharded with FSDP2 (each decoder layer, then the root) on gloo for two steps, saves a
checkpoint, loads it into a freshly initialized sharded model and checks, on rank 0, that the full model and
optimizer state dicts match exactly, that each rank's RNG continues where it stopped, and that one more
training step gives the same loss on both models. Then exports the policy for Hugging Face and writes
`reference.pt` (probe logits, full model state dicts at steps 2 and 3) for the parent test to compare against.

Finally it loads `<out_dir>/single`, a checkpoint the parent saved from one process, into a sharded model
(resharding 1 -> 2): rank 0 restores its RNG, rank 1 has none and must be reseeded from (seed, rank) with a
warning; the loaded full state dict goes into `reference.pt` as `from_single`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2ForCausalLM

from npo_engine.checkpoint import CheckpointManager, _derived_seed
from npo_engine.models import demo_model_config

VOCAB = 52


def build(
    seed: int, mesh
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(demo_model_config(VOCAB))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, tokens: torch.Tensor) -> float:
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def full_state(model, optimizer) -> tuple[dict, dict]:
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def assert_same(name: str, a, b) -> None:
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise AssertionError(f"{name}: keys differ: {sorted(set(a) ^ set(b))}")
        for key in a:
            assert_same(f"{name}.{key}", a[key], b[key])
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{name}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(f"{name}[{i}]", x, y)
    elif isinstance(a, torch.Tensor):
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: tensors differ, max abs diff {(a - b).abs().max().item()}")
    elif a != b:
        raise AssertionError(f"{name}: {a!r} != {b!r}")


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own data stream
    batch = lambda: torch.randint(0, VOCAB, (2, 12), generator=data)  # noqa: E731

    model, optimizer, scheduler = build(seed=0, mesh=mesh)
    for _ in range(2):
        train_step(model, optimizer, scheduler, batch())

    manager = CheckpointManager(out / "ckpt", rank=rank, world_size=world)
    saved = manager.save(
        2, model, optimizer, scheduler=scheduler, extra={"step": 2}, generators={"data": data}
    )
    if manager.latest() != saved:
        raise AssertionError(f"latest() is {manager.latest()}, expected {saved}")
    rand_after_save = torch.rand(4)
    next_batch = batch()
    expected_model, expected_optim = full_state(model, optimizer)

    fresh, fresh_optimizer, fresh_scheduler = build(seed=1, mesh=mesh)
    extra = manager.load(saved, fresh, fresh_optimizer, scheduler=fresh_scheduler, generators={"data": data})
    if extra != {"step": 2}:
        raise AssertionError(f"extra is {extra}")
    if not torch.equal(torch.rand(4), rand_after_save):
        raise AssertionError(f"rank {rank}: torch RNG did not continue from the saved state")
    if not torch.equal(batch(), next_batch):
        raise AssertionError(f"rank {rank}: the data generator did not continue from the saved state")
    if fresh_scheduler.state_dict()["last_epoch"] != 2:
        raise AssertionError(f"scheduler state not restored: {fresh_scheduler.state_dict()}")
    loaded_model, loaded_optim = full_state(fresh, fresh_optimizer)
    if rank == 0:
        assert_same("model", expected_model, loaded_model)
        assert_same("optim", expected_optim, loaded_optim)
        if len(expected_model) == 0:
            raise AssertionError("rank 0 received an empty full state dict")

    loss_a = train_step(model, optimizer, scheduler, next_batch)
    loss_b = train_step(fresh, fresh_optimizer, fresh_scheduler, next_batch)
    if loss_a != loss_b:
        raise AssertionError(f"rank {rank}: continued training differs: {loss_a} vs {loss_b}")

    manager.export_hf(3, model, out / "export")
    probe = torch.arange(VOCAB, dtype=torch.long).remainder(VOCAB).view(2, -1)
    with torch.no_grad():
        logits = model(probe).logits
    final_model, _ = full_state(model, optimizer)

    single = CheckpointManager(out / "single", rank=rank, world_size=world)
    resharded, resharded_optimizer, _ = build(seed=2, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single.load(single.latest(), resharded, resharded_optimizer, seed=7)
    reseeded = any("reseeding" in str(w.message) for w in caught)
    if reseeded != (rank == 1):
        raise AssertionError(
            f"rank {rank}: reseed warning {'missing' if rank == 1 else 'unexpected'}: {caught}"
        )
    if rank == 1:
        expected = torch.rand(4, generator=torch.Generator().manual_seed(_derived_seed(7, rank)))
        if not torch.equal(torch.rand(4), expected):
            raise AssertionError("rank 1 was not reseeded from (seed, rank)")
    from_single, _ = full_state(resharded, resharded_optimizer)

    if rank == 0:
        reference = {
            "probe": probe,
            "logits": logits,
            "step2_model": expected_model,
            "step3_model": final_model,
            "from_single": from_single,
        }
        torch.save(reference, out / "reference.pt")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
