"""The embedded engine's KV cache: every layer's K/V in buffers preallocated for a whole batch, written in
place.

`PreallocatedCache` holds, per decoder layer, K/V buffers `[B, H_kv, capacity, D]` (the engine sizes them
`W + max_new_tokens`, `W` the widest prompt). It is a transformers `Cache`, so models running through their
own HF forward use it too. Its life, in the engine's order:

- **Prefill, left-padded.** A batch's prompts are right-aligned: row i holds its `n_i`-token prompt in columns
  `[W - n_i, W)`. `prefill_into(src, dst, column)` routes the next forward's K/V rows `src` to cache rows
  `dst` from `column` on (so a bucket of prompts `w` wide lands at column `W - w`, and one prefill row can
  fill several cache rows); that forward's attention sees only its own K/V. Columns left of a prompt stay zero
  and are masked by the engine.
- **Decoding.** `start_decoding(W)` sets the write position to `W`; each forward then appends one column and
  gets back views of the filled prefix `[0, length)`: nothing is concatenated or reallocated per step.
- **Compaction.** `select_rows(rows)` keeps only some batch rows, in a given order.

A cache serves one batch; the engine builds a new one per batch, over memory it keeps from batch to batch
(`CacheStorage`): the buffers are views of blocks allocated once and zeroed per batch, not fresh allocations
(which on CPU are fresh pages to fault in at every rollout).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class CacheStorage:
    """Memory for the K/V buffers of successive caches: one flat block per (layer, K or V), grown when a batch
    needs more and otherwise reused. A cache built over it owns the memory until the next cache is built."""

    def __init__(self):
        self._blocks: dict[tuple[int, str], torch.Tensor] = {}

    def zeros(self, key: tuple[int, str], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A zeroed contiguous tensor of `shape` with `like`'s dtype and device, in block `key`'s memory."""
        numel = math.prod(shape)
        block = self._blocks.get(key)
        if block is None or block.numel() < numel or block.dtype != like.dtype or block.device != like.device:
            block = self._blocks[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return block[:numel].view(shape).zero_()


class PreallocatedLayer(CacheLayerMixin):
    """One layer's K/V in fixed buffers `[B, H_kv, capacity, D]`, written in place.

    Prefill (`prefill_target` set): the forward's rows `src` land in cache rows `dst` at columns
    `column : column + Q`, and attention sees only the forward's own K/V. Decoding: one column per step, and
    `update` returns views of the filled prefix, so nothing is concatenated or reallocated per step.
    """

    is_sliding = False

    def __init__(self, batch: int, capacity: int, storage: CacheStorage | None = None, index: int = 0):
        super().__init__()
        self.batch, self.capacity = batch, capacity
        self.storage, self.index = storage, index
        self.length = 0
        self.prefill_target: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Zeros, not empty: columns left of a short prefill bucket are never written, and a masked key whose
        # value is NaN still poisons the attention output (0 * NaN).
        heads = key_states.shape[1]
        k_shape = (self.batch, heads, self.capacity, key_states.shape[-1])
        v_shape = (self.batch, heads, self.capacity, value_states.shape[-1])
        if self.storage is None:
            self.keys, self.values = key_states.new_zeros(k_shape), value_states.new_zeros(v_shape)
        else:
            self.keys = self.storage.zeros((self.index, "k"), k_shape, key_states)
            self.values = self.storage.zeros((self.index, "v"), v_shape, value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store one forward's K/V ([B or N, H_kv, Q, D] each); return the K/V its attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prefill_target is not None:
            src, dst, column = self.prefill_target
            end = column + key_states.shape[-2]
            self.keys[dst, :, column:end] = key_states.index_select(0, src)
            self.values[dst, :, column:end] = value_states.index_select(0, src)
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # an internal invariant: the engine sizes the buffers for the whole batch
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` ([B'] int64), in that order."""
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class PreallocatedCache(Cache):
    """A `Cache` of `PreallocatedLayer`s, one per decoder layer: B rows, `capacity` columns; over `storage`'s
    memory when given (which then must not back another cache still in use)."""

    def __init__(self, num_layers: int, batch: int, capacity: int, *, storage: CacheStorage | None = None):
        super().__init__(layers=[PreallocatedLayer(batch, capacity, storage, i) for i in range(num_layers)])

    def prefill_into(self, src: torch.Tensor, dst: torch.Tensor, column: int) -> None:
        """Route the next forward's K/V rows `src` ([N] int64) to cache rows `dst` ([N]) from `column` on."""
        for layer in self.layers:
            layer.prefill_target = (src, dst, column)

    def start_decoding(self, filled: int) -> None:
        """End the prefill: columns `[0, filled)` hold the prompts; each forward now appends one column."""
        for layer in self.layers:
            layer.prefill_target, layer.length = None, filled

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` ([B'] int64), in that order, in every layer."""
        for layer in self.layers:
            layer.select_rows(rows)
