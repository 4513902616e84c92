"""Push the trainer's weights into a rollout engine: gather per block, pack into buckets, hand over, verify.

    sync = WeightSync(engine, "policy", dtype=torch.bfloat16, config=cfg.sync, trainer_logprobs=trainer.trainer_logprobs)
    metrics = sync.push(model, step=step)   # after optimizer.step(), before the next generate()

One sync, for every group of the plan (`plan.py`; built on the first push and cached):
1. **Gather** the group's tensors. FSDP2 shards (a DTensor sharded on dim 0 of a 1-D mesh) are cast to the
   engine dtype and packed into one flat send buffer by the pack kernel, then all-gathered in one collective
   (half the bytes of gather-then-cast for a bf16 engine); other DTensors use `full_tensor()` after the cast;
   plain tensors are read as they are.
2. **Pack** each bucket once its last tensor is gathered: one kernel call casts and copies every piece into the
   bucket and, with `verify`, computes the bucket's fingerprint in the same pass.
3. **Hand over** the buckets lazily to `engine.load_buckets`, which returns its own fingerprint of each one.

Verification (`SyncConfig.verify`, on by default): sender and receiver fingerprints must agree for every bucket;
every `probe_every` syncs the engine's log-probs of a fixed probe batch (`engine.score`) are compared with the
trainer's (`trainer_logprobs`), and a mean absolute difference above `probe_tolerance` is an error naming the
engine, the step and the parameter group that differs most. Any failure marks the engine stale
(`engine.weights_stale` holds the reason) and raises `SyncError`, saying whether the engine was left half-updated.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from npo_engine.config.schema import SyncConfig
from npo_engine.rollout.base import RolloutEngine, WeightBucket
from npo_engine.sync import ops as sync_ops
from npo_engine.sync.fingerprints import FingerprintBlocks
from npo_engine.sync.plan import SyncPlan, build_plan, hf_name, model_signature, unique_state

_MIB = 2**20


class SyncError(RuntimeError):
    """A weight sync failed or did not verify; the engine named in the message is marked stale."""


# The settings are the run config's `sync` section (each default lives there, with its measurement).
SyncSettings = SyncConfig

LogprobFn = Callable[[list[list[int]], list[list[int]]], list[torch.Tensor]]


class WeightSync:
    """Keeps one engine (`role`: "policy" or "guide") current with the trainer's weights. One per engine.

    Args:
        engine: the receiver (`RolloutEngine.load_buckets`, and `score` for the probe).
        role: the engine's name in metrics and errors.
        dtype: the engine's floating dtype (tensors are cast to it before the gather); None keeps the trainer's.
        config: bucket size, verification and probe settings (`npo_engine.config.SyncConfig`).
        trainer_logprobs: (prompts, completions) -> per-token fp32 log-probs under the trainer's weights, for the
            probe; collective under FSDP, like the sync. None disables the probe.
        temperature: the temperature both sides score the probe at (the rollout's).
        seed: seeds the probe batch's tokens.
    """

    def __init__(self, engine: RolloutEngine, role: str, *, dtype: torch.dtype | None, config=None,
                 trainer_logprobs: LogprobFn | None = None, temperature: float = 1.0, seed: int = 0):
        self.engine, self.role, self.dtype = engine, role, dtype
        self.config = config if config is not None else SyncSettings()
        self.trainer_logprobs, self.temperature, self.seed = trainer_logprobs, temperature, seed
        self.plan: SyncPlan | None = None
        self.syncs = 0
        self._ops = sync_ops.get(getattr(self.config, "backend", "auto"))
        self._buffers: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._probe_batch: tuple[list[list[int]], list[list[int]]] | None = None

    # ------------------------------------------------------------------------------------------------ push

    def push(self, model: nn.Module, *, step: int | None = None) -> dict[str, float]:
        """Load `model`'s current weights into the engine (collective under FSDP: every rank calls it).

        Returns metrics: `time/sync/<role>`, `sync/bytes/<role>`, `sync/buckets/<role>`, the probe's
        `sync/probe_logp_diff/<role>` and `sync/probe_logp_maxdiff/<role>` when it ran, and `time/sync` (this
        sync's seconds, as before per-engine keys existed)."""
        start = time.perf_counter()
        where = f"the {self.role} engine's weight sync" + (f" at step {step}" if step is not None else "")
        state = unique_state(model)
        plan = self._plan_for(model, state)
        verify = bool(self.config.verify)
        sent: list[WeightBucket] = []
        try:
            received = self.engine.load_buckets(self._buckets(plan, dict(state), verify, sent), verify=verify)
        except BaseException as exc:
            half = f"after {len(sent)} of {len(plan.buckets)} buckets"
            self._mark_stale(f"{where} failed {half}: {type(exc).__name__}: {exc}")
            raise SyncError(f"{where} failed {half} ({type(exc).__name__}: {exc}); the engine may now hold a mix of "
                            "old and new weights and is marked stale until a sync succeeds") from exc
        finally:
            if not self.config.keep_buffers or self._device.type == "cuda":
                self._buffers.clear()  # between syncs the bucket memory belongs to training
                self._views.clear()
        if verify:
            self._check_fingerprints(plan, sent, received, where)
        self.syncs += 1
        self.engine.weights_stale = None
        seconds = time.perf_counter() - start
        role = self.role
        metrics = {"time/sync": seconds, f"time/sync/{role}": seconds,
                   f"sync/bytes/{role}": float(plan.total_bytes), f"sync/buckets/{role}": float(len(plan.buckets))}
        every = int(self.config.probe_every)
        if self.trainer_logprobs is not None and every > 0 and (self.syncs - 1) % every == 0:
            metrics |= self.probe(model, where)
        return metrics

    def _plan_for(self, model: nn.Module, state: list[tuple[str, torch.Tensor]]) -> SyncPlan:
        bucket_bytes = max(int(self.config.bucket_mb * _MIB), 64)
        if self.plan is None or self.plan.signature != model_signature(state) or \
                self.plan.bucket_bytes != bucket_bytes:
            self.plan = build_plan(model, dtype=self.dtype, bucket_bytes=bucket_bytes)
            self._buffers.clear()
            self._views.clear()
        return self.plan

    def _mark_stale(self, reason: str) -> None:
        self.engine.weights_stale = reason

    # --------------------------------------------------------------------------------------- gather + pack

    def _buckets(self, plan: SyncPlan, tensors: dict[str, torch.Tensor], verify: bool,
                 sent: list[WeightBucket]) -> Iterator[WeightBucket]:
        """Gather group by group; yield each bucket as soon as its last tensor is there."""
        pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        reuse = bool(getattr(self.engine, "releases_buckets", False))
        next_bucket = 0
        for group in plan.groups:
            for slot_index, pieces in self._gather(plan, group.slots, tensors):
                slot = plan.slots[slot_index]
                srcs, views = pending.setdefault(slot.bucket, ([], []))
                whole = self._bucket_views(plan, slot.bucket, reuse)[slot.position]
                for src, row in pieces:
                    srcs.append(src)
                    views.append(whole if row is None else whole[row : row + src.shape[0]])
            # Buckets whose every tensor is gathered go out now, in order.
            last_slot = group.slots[-1]
            while next_bucket < len(plan.buckets) and plan.buckets[next_bucket].slots[-1] <= last_slot:
                srcs, views = pending.pop(next_bucket, ([], []))
                bucket = self._pack(plan, next_bucket, srcs, views, verify, reuse)
                sent.append(bucket)
                yield bucket
                next_bucket += 1

    def _gather(self, plan: SyncPlan, slot_indices: tuple[int, ...], tensors: dict[str, torch.Tensor]
                ) -> Iterator[tuple[int, list[tuple[torch.Tensor, int | None]]]]:
        """(slot, [(full tensor or a block of its rows, first row or None for the whole tensor)]) for a group."""
        from torch.distributed.tensor import DTensor, Shard

        sharded: list[int] = []
        for i in slot_indices:
            tensor = tensors[plan.slots[i].key].detach()
            if isinstance(tensor, DTensor):
                if tensor.device_mesh.ndim == 1 and tuple(tensor.placements) == (Shard(0),) and tensor.dim() > 0:
                    sharded.append(i)
                    continue
                tensor = tensor.to(plan.slots[i].entry.dtype).full_tensor()  # other layouts: cast, then gather
            yield i, [(tensor, None)]
        if sharded:
            yield from self._gather_shards(plan, sharded, tensors)

    def _gather_shards(self, plan: SyncPlan, slot_indices: list[int], tensors: dict[str, torch.Tensor]
                       ) -> Iterator[tuple[int, list[tuple[torch.Tensor, int | None]]]]:
        """One all-gather for a group's dim-0 shards, cast to the engine dtype before it.

        Rank r holds rows [r * c, min((r + 1) * c, n)) of each tensor (c = ceil(n / W), as torch.chunk, which
        FSDP2 follows); each rank sends every tensor's shard padded to c rows at a fixed offset."""
        first = tensors[plan.slots[slot_indices[0]].key]
        mesh = first.device_mesh
        world, group = mesh.size(), mesh.get_group()
        layout, offset = [], 0
        for i in slot_indices:
            entry = plan.slots[i].entry
            rows = -(-entry.shape[0] // world)
            row_bytes = entry.nbytes // max(entry.shape[0], 1)
            layout.append((i, rows, offset))
            offset += -(-rows * row_bytes // 64) * 64
        device = first.to_local().device
        send = torch.empty(offset, dtype=torch.uint8, device=device)
        srcs, views = [], []
        for (i, rows, off) in layout:
            entry, local = plan.slots[i].entry, tensors[plan.slots[i].key].to_local()
            if local.shape[0] > rows:
                raise ValueError(f"{entry.name}: a local shard of {local.shape[0]} rows, more than ceil({entry.shape[0]}"
                                 f" / {world}); the sync expects FSDP2's even dim-0 sharding")
            if local.shape[0]:
                srcs.append(local)
                views.append(send[off : off + local.numel() * entry.dtype.itemsize].view(entry.dtype)
                             .view(local.shape))
        self._ops.pack(srcs, views, send, None)
        recv = torch.empty(world * offset, dtype=torch.uint8, device=device)
        dist.all_gather_into_tensor(recv, send, group=group)
        for (i, rows, off) in layout:
            entry = plan.slots[i].entry
            n, tail = entry.shape[0], entry.shape[1:]
            row_numel = math.prod(tail)
            pieces = []
            for r in range(world):
                lo, hi = r * rows, min((r + 1) * rows, n)
                if hi <= lo:
                    continue
                base = r * offset + off
                chunk = recv[base : base + (hi - lo) * row_numel * entry.dtype.itemsize]
                pieces.append((chunk.view(entry.dtype).view(hi - lo, *tail), lo))
            yield i, pieces

    def _bucket_views(self, plan: SyncPlan, index: int, reuse: bool) -> list[torch.Tensor]:
        """Typed views of bucket `index`'s entries into its buffer (cached with the buffer)."""
        buffer = self._buffer(plan, index, reuse)
        key = (buffer.data_ptr(), index)
        if key not in self._views:
            self._views[key] = [buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
                                for e in plan.buckets[index].entries]
        return self._views[key]

    def _buffer(self, plan: SyncPlan, index: int, reuse: bool) -> torch.Tensor:
        """The memory of bucket `index`: one buffer for all buckets when the engine releases each bucket before
        asking for the next; else one per bucket. Freed after each sync unless `sync.keep_buffers` (CPU only)."""
        device = self._device
        key = (-1 if reuse else index, device)
        if key not in self._buffers:
            size = plan.max_bucket_bytes if reuse else plan.buckets[index].nbytes
            self._buffers[key] = torch.empty(size, dtype=torch.uint8, device=device)
        return self._buffers[key]

    @functools.cached_property
    def _device(self) -> torch.device:
        """Where the buckets live: the engine's device (the embedded engine's model), else the current CUDA device
        or the CPU."""
        model = getattr(self.engine, "model", None)
        if isinstance(model, nn.Module):
            device = next(model.parameters()).device
            if device.type != "meta":
                return device
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _pack(self, plan: SyncPlan, index: int, srcs: list[torch.Tensor], views: list[torch.Tensor], verify: bool,
              reuse: bool) -> WeightBucket:
        layout = plan.buckets[index]
        data = self._buffer(plan, index, reuse)[: layout.nbytes]
        srcs = [s.to(data.device, non_blocking=True) if s.device != data.device else s for s in srcs]
        sums = FingerprintBlocks(layout.nbytes, device=data.device, backend=self._ops.name) if verify else None
        self._ops.pack(srcs, views, data, sums.sums if sums else None)
        return WeightBucket(data=data, entries=layout.entries, fingerprint=sums.value() if sums else None,
                            index=index, count=len(plan.buckets))

    # --------------------------------------------------------------------------------------------- verify

    def _check_fingerprints(self, plan: SyncPlan, sent: list[WeightBucket], received: list[int], where: str) -> None:
        if len(received) != len(sent):
            self._mark_stale(f"{where}: {len(received)} receiver fingerprints for {len(sent)} buckets")
            raise SyncError(f"{where}: the engine returned {len(received)} fingerprints for {len(sent)} buckets; "
                            "it is marked stale")
        bad = [b for b, got in zip(sent, received) if b.fingerprint != got]
        if bad:
            first = bad[0]
            groups = sorted({plan.groups[plan.slots[s].group].name for s in plan.buckets[first.index].slots})
            reason = (f"{where}: {len(bad)} of {len(sent)} buckets arrived different from what was sent (bucket "
                      f"{first.index}: sent fingerprint {first.fingerprint:#018x}, engine holds "
                      f"{received[first.index]:#018x}; its groups: {', '.join(groups)})")
            self._mark_stale(reason)
            raise SyncError(reason + "; the engine is marked stale")

    def probe_batch(self, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
        """The fixed probe batch: `probe_rows` rows of `probe_tokens` prompt and completion tokens drawn from the
        vocabulary by a seeded generator (any tokens do: the probe compares two computations of their log-probs)."""
        if self._probe_batch is None:
            gen = torch.Generator().manual_seed(self.seed)
            rows, n = int(self.config.probe_rows), int(self.config.probe_tokens)
            ids = torch.randint(0, vocab_size, (rows, 2 * n), generator=gen).tolist()
            self._probe_batch = ([row[:n] for row in ids], [row[n:] for row in ids])
        return self._probe_batch

    def probe(self, model: nn.Module, where: str) -> dict[str, float]:
        """Engine vs trainer log-probs on the probe batch; above `probe_tolerance` (on any rank) it is an error
        naming the parameter group whose engine copy differs most from the trainer's."""
        vocab = int(model.get_input_embeddings().weight.shape[0])
        prompts, completions = self.probe_batch(vocab)
        trainer = self.trainer_logprobs(prompts, completions)
        engine = self.engine.score(prompts, completions, temperature=self.temperature)
        diff = torch.cat([(a.float().cpu() - b.float().cpu()).abs() for a, b in zip(engine, trainer)])
        mean, worst = float(diff.mean()), float(diff.max())
        if dist.is_initialized():  # every rank decides alike, so the diagnosis's gathers match
            both = torch.tensor([mean, worst], dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            mean, worst = both.tolist()
        role = self.role
        metrics = {f"sync/probe_logp_diff/{role}": mean, f"sync/probe_logp_maxdiff/{role}": worst}
        if not (mean <= self.config.probe_tolerance):  # NaN fails too
            group, rel = self.diagnose(model)
            culprit = (f"largest difference in parameter group {group!r} (relative {rel:.3g})" if group
                       else "the engine cannot export its weights, so no group is named")
            reason = (f"{where}: the log-prob parity probe failed: mean |engine - trainer| = {mean:.3g} "
                      f"(max {worst:.3g}) over {diff.numel()} tokens, above sync.probe_tolerance = "
                      f"{self.config.probe_tolerance}; {culprit}")
            self._mark_stale(reason)
            raise SyncError(reason + "; the engine is marked stale")
        return metrics

    @torch.no_grad()
    def diagnose(self, model: nn.Module) -> tuple[str | None, float]:
        """The group whose engine tensors differ most (relative L2 norm) from the trainer's cast to the engine
        dtype, and that difference; (None, nan) if the engine does not expose its weights (`engine.model`)."""
        from torch.distributed.tensor import DTensor

        held = getattr(self.engine, "model", None)
        if not isinstance(held, nn.Module) or self.plan is None:
            return None, math.nan
        engine_state = held.state_dict()
        worst: dict[str, float] = {}
        for key, tensor in unique_state(model):
            tensor = tensor.detach()
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            name = hf_name(key)
            if name not in engine_state:
                continue
            mine = engine_state[name]
            ref = tensor.to(mine.dtype).to(mine.device).double()
            rel = float((mine.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            group = self.plan.group_of(name)
            worst[group] = max(worst.get(group, 0.0), rel)
        if not worst:
            return None, math.nan
        group = max(worst, key=worst.get)
        return group, worst[group]


# ----------------------------------------------------------------------------------------- one-call helpers


def policy_logprob_fn(policy: nn.Module, *, device: torch.device, pad_token_id: int,
                      temperature: float) -> LogprobFn:
    """The trainer's side of the probe: `policy` is a `models.LogprobModel` (sharded or not); the log-probs are
    tempered and untruncated, as `RolloutEngine.score`'s. Collective under FSDP, like the sync: every rank scores
    the same probe batch."""

    @torch.no_grad()
    def logprobs(prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, (p, row) in enumerate(zip(prompts, rows)):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
            target_mask[b, len(p) : len(row)] = True
        logp, _ = policy(input_ids.to(device), attention_mask.to(device), target_mask.to(device),
                         temperature=temperature or 1.0)
        return [row[m].float().cpu() for row, m in zip(logp, target_mask.to(device))]

    return logprobs



def push_weights(model: nn.Module, engine: RolloutEngine, *, dtype: torch.dtype | None = None,
                 bucket_bytes: int | None = None, verify: bool = True, role: str = "policy",
                 step: int | None = None) -> dict[str, float]:
    """One verified bucketed sync of `model` into `engine`, without the probe. The `WeightSync` (and so the plan)
    is kept on the engine and reused by later calls with the same settings."""
    settings = SyncSettings(verify=verify, probe_every=0,
                            bucket_mb=(bucket_bytes / _MIB) if bucket_bytes else SyncSettings.bucket_mb)
    sync = getattr(engine, "_npo_weight_sync", None)
    if not isinstance(sync, WeightSync) or sync.config != settings or sync.dtype != dtype or sync.role != role:
        sync = WeightSync(engine, role, dtype=dtype, config=settings)
        engine._npo_weight_sync = sync
    return sync.push(model, step=step)


def iter_full_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, full tensor) for every parameter and persistent buffer of `model`, each tied
    tensor once, one `full_tensor()` per sharded parameter: the per-parameter path (the benchmarks' baseline)."""
    from torch.distributed.tensor import DTensor

    for name, tensor in unique_state(model):
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # cast before the gather: half the bytes for a bf16 engine
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield hf_name(name), tensor


def fingerprint(named_tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> float:
    """An order-independent float64 checksum of named tensors, to check that two copies of weights agree.

    Each tensor contributes sum(values * (1 + position / numel)), so permuted or shifted values change it. (For
    bit-exact checks of buckets see `fingerprints.bucket_fingerprint`.)
    """
    items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
    total = 0.0
    for _, tensor in items:
        flat = tensor.detach().reshape(-1).to(torch.float64).cpu()
        weights = 1.0 + torch.arange(flat.numel(), dtype=torch.float64) / max(flat.numel(), 1)
        total += float((flat * weights).sum())
    return total
