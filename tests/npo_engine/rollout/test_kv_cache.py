"""The embedded engine's KV cache on its own: where each forward's K/V land and what attention gets back.

Against hand-placed expectations: K/V are random tensors, each test names the columns they must occupy. Two
layers, so every call is checked to reach all of them.
"""

from __future__ import annotations

import pytest
import torch

from npo_engine.rollout.kv_cache import CacheStorage, PreallocatedCache

LAYERS, HEADS_KV, DIM = 2, 2, 4


def _kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V of one forward: [batch, H_kv, length, D] each."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, HEADS_KV, length, DIM, generator=gen) for _ in range(2))


def _update_all(cache: PreallocatedCache, keys: torch.Tensor, values: torch.Tensor):
    """One forward's `update` in every layer, as a model calls it; returns what each layer gave back."""
    return [cache.update(keys, values, layer) for layer in range(LAYERS)]


def test_decoding_appends_one_column_and_returns_views_of_the_filled_prefix():
    cache = PreallocatedCache(LAYERS, batch=2, capacity=5)
    prompt_k, prompt_v = _kv(2, 3, seed=0)
    _update_all(cache, prompt_k, prompt_v)  # no prefill routing: a plain append of 3 columns
    assert cache.get_seq_length() == 3

    step_k, step_v = _kv(2, 1, seed=1)
    for layer, (k, v) in enumerate(_update_all(cache, step_k, step_v)):
        assert k.shape == v.shape == (2, HEADS_KV, 4, DIM)
        torch.testing.assert_close(k, torch.cat([prompt_k, step_k], dim=2), rtol=0, atol=0)
        torch.testing.assert_close(v, torch.cat([prompt_v, step_v], dim=2), rtol=0, atol=0)
        # Views of the preallocated buffers: nothing was copied or reallocated.
        assert k.data_ptr() == cache.layers[layer].keys.data_ptr()
        assert v.data_ptr() == cache.layers[layer].values.data_ptr()
    assert cache.get_seq_length() == 4 and cache.get_max_length() == 5
    assert cache.layers[0].get_mask_sizes(query_length=1) == (5, 0)  # keys the next one-token query sees

    _update_all(cache, *_kv(2, 1, seed=2))  # fills the last column
    with pytest.raises(RuntimeError, match="KV cache overflow: 6 positions > capacity 5"):
        cache.update(*_kv(2, 1, seed=3), 0)


def test_left_padded_prefill_lands_right_aligned_and_leaves_zeros():
    """Three rows, widest prompt W = 4: a 4-token prompt shared by rows 0 and 2 (one prefill row, two cache
    rows), then a 2-token prompt for row 1 at column W - 2 = 2; decoding then starts at column W."""
    width, capacity = 4, 6
    cache = PreallocatedCache(LAYERS, batch=3, capacity=capacity)

    long_k, long_v = _kv(1, 4, seed=0)
    cache.prefill_into(src=torch.tensor([0, 0]), dst=torch.tensor([0, 2]), column=0)
    for k, v in _update_all(cache, long_k, long_v):
        assert k is long_k and v is long_v  # a prefill attends over its own K/V only
    short_k, short_v = _kv(1, 2, seed=1)
    cache.prefill_into(src=torch.tensor([0]), dst=torch.tensor([1]), column=width - 2)
    _update_all(cache, short_k, short_v)

    for layer in cache.layers:
        for row in (0, 2):
            torch.testing.assert_close(layer.keys[row, :, :width], long_k[0], rtol=0, atol=0)
            torch.testing.assert_close(layer.values[row, :, :width], long_v[0], rtol=0, atol=0)
        torch.testing.assert_close(layer.keys[1, :, 2:width], short_k[0], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[1, :, 2:width], short_v[0], rtol=0, atol=0)
        # Left of the short prompt, and right of every prompt: zeros (masked keys must not hold NaN garbage).
        assert (layer.keys[1, :, :2] == 0).all() and (layer.values[1, :, :2] == 0).all()
        assert (layer.keys[:, :, width:] == 0).all() and (layer.values[:, :, width:] == 0).all()

    cache.start_decoding(width)
    assert cache.get_seq_length() == width
    step_k, step_v = _kv(3, 1, seed=2)
    for layer, (k, _) in zip(cache.layers, _update_all(cache, step_k, step_v)):
        assert k.shape[2] == width + 1
        torch.testing.assert_close(layer.keys[:, :, width], step_k[:, :, 0], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[:, :, width], step_v[:, :, 0], rtol=0, atol=0)


def test_start_decoding_resets_routing_and_write_position():
    """`start_decoding` drops the prefill routing (later forwards append to every row) and sets where the next
    column is written, whatever was written before."""
    cache = PreallocatedCache(LAYERS, batch=2, capacity=6)
    cache.prefill_into(src=torch.tensor([0, 1]), dst=torch.tensor([0, 1]), column=0)
    _update_all(cache, *_kv(2, 5, seed=0))
    assert cache.get_seq_length() == 0  # a prefill does not move the write position

    cache.start_decoding(2)
    assert all(layer.prefill_target is None for layer in cache.layers)
    step_k, step_v = _kv(2, 1, seed=1)
    k, v = _update_all(cache, step_k, step_v)[0]
    assert k.shape[2] == 3 and cache.get_seq_length() == 3
    torch.testing.assert_close(k[:, :, 2], step_k[:, :, 0], rtol=0, atol=0)  # column 2 overwritten


def test_select_rows_keeps_rows_in_the_given_order():
    cache = PreallocatedCache(LAYERS, batch=3, capacity=4)
    cache.select_rows(torch.tensor([0, 2]))  # before the first forward: nothing allocated, nothing to do
    prompt_k, prompt_v = _kv(3, 2, seed=0)
    _update_all(cache, prompt_k, prompt_v)

    cache.select_rows(torch.tensor([2, 0]))
    step_k, step_v = _kv(2, 1, seed=1)
    for k, v in _update_all(cache, step_k, step_v):
        assert k.shape == (2, HEADS_KV, 3, DIM)
        torch.testing.assert_close(k[:, :, :2], prompt_k[[2, 0]], rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, :2], prompt_v[[2, 0]], rtol=0, atol=0)
        torch.testing.assert_close(k[:, :, 2:], step_k, rtol=0, atol=0)


def test_caches_over_one_storage_reuse_its_memory_and_start_from_zeros():
    """A second cache over the same storage writes into the first one's memory (no new allocation), starts
    zeroed whatever the first left there, and a larger batch grows the storage."""
    storage = CacheStorage()
    first = PreallocatedCache(LAYERS, batch=2, capacity=5, storage=storage)
    _update_all(first, *_kv(2, 5, seed=0))
    second = PreallocatedCache(LAYERS, batch=2, capacity=4, storage=storage)
    second.prefill_into(torch.tensor([0]), torch.tensor([1]), column=2)  # fills row 1, columns 2-3 only
    _update_all(second, *_kv(1, 2, seed=1))
    for a, b in zip(first.layers, second.layers):
        assert b.keys.data_ptr() == a.keys.data_ptr() and b.values.data_ptr() == a.values.data_ptr()
        assert b.keys.shape == (2, HEADS_KV, 4, DIM)
        assert not b.keys[0].any() and not b.keys[1, :, :2].any() and b.keys[1, :, 2:].all()
    bigger = PreallocatedCache(LAYERS, batch=4, capacity=5, storage=storage)
    _update_all(bigger, *_kv(4, 5, seed=2))
    assert bigger.layers[0].keys.shape == (4, HEADS_KV, 5, DIM)
