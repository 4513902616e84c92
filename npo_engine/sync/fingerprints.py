"""The 64-bit fingerprint of a weight bucket: defined here once, computed by csrc/ or by the PyTorch fallback below.

Definition (bytes `d[0 .. n)`, `n` a multiple of 4; shorter tails are zero-padded):

    w_i   = little-endian uint32 of d[4i .. 4i+4)                      (word i)
    K_j   = (splitmix64(_KEY_SEED + j) >> 32) | 1,  j in [0, 1024)       (odd 32-bit keys, one per word of a block)
    S_b   = sum over j of  w_{1024 b + j} * K_j            mod 2**64     (block b: 4 KiB, zero words beyond n)
    fp(d) = sum over b of  mix64(S_b + (b + 1) * _GOLDEN)  mod 2**64     (mix64: splitmix64's finalizer)

Why this shape:
- **Parallel and order-free.** Blocks are independent and combined by a sum mod 2**64, which is associative
  and commutative, so any split over threads or CUDA blocks gives the same bits: CPU, CUDA and this fallback
  agree exactly on identical bytes.
- **Per tensor.** `S_b` is a sum over words, so a tensor placed at byte offset `o` of a bucket contributes to the
  blocks it covers without being copied there (`FingerprintBlocks.add`): an engine fingerprints its own
  parameters in bucket layout, and padding (zero words) contributes nothing.
- **What it catches.** Any change confined to one 32-bit word (one flipped bit, one wrong element) always changes
  `fp`: `delta * K_j` is nonzero mod 2**64 for an odd `K_j` and `0 < |delta| < 2**32`, and `mix64` is a
  bijection. Moved words see other keys (within a block) or another block index. Other corruptions collide with
  probability about 2**-64 per the final sum. It is a checksum against accidents (stale, partial, misplaced or
  miscast tensors, flipped bits), not a cryptographic hash.

The fallback splits every key into 16-bit halves so the per-block products and sums stay below 2**63 in int64
(exact on any device), and does the mod-2**64 arithmetic on the small per-block array in numpy's uint64.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_BYTES = 4096
"""Bytes per fingerprint block (1024 words): the unit of parallel work and of position in the combine."""
BLOCK_WORDS = BLOCK_BYTES // 4
_KEY_SEED = 0x6E706F5F73796E63  # "npo_sync"
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / phi, splitmix64's increment
_MASK64 = (1 << 64) - 1
# Words per chunk of the fallback: bounds its int64 temporaries to ~3 x 64 MiB.
_FALLBACK_CHUNK_WORDS = 1 << 23


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _make_keys() -> torch.Tensor:
    """K_j as int64 values in [1, 2**32), the table every implementation is given (never recomputed)."""
    return torch.tensor([(_splitmix64(_KEY_SEED + j) >> 32) | 1 for j in range(BLOCK_WORDS)], dtype=torch.int64)


KEYS = _make_keys()
"""[1024] int64: the block keys K_j (odd, < 2**32). csrc/ kernels take this tensor as an argument."""
_KEYS_LO, _KEYS_HI = KEYS & 0xFFFF, KEYS >> 16
_keys_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def keys_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K low 16 bits, K high 16 bits) on `device`, cached."""
    if device not in _keys_on:
        _keys_on[device] = (KEYS.to(device), _KEYS_LO.to(device), _KEYS_HI.to(device))
    return _keys_on[device]


def num_blocks(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES)


def combine(block_sums: torch.Tensor) -> int:
    """fp from the per-block sums S_b ([nblocks] int64 holding uint64 bits), as a Python int in [0, 2**64)."""
    s = block_sums.detach().cpu().contiguous().numpy().view(np.uint64)
    with np.errstate(over="ignore"):
        b = np.arange(1, len(s) + 1, dtype=np.uint64)
        x = s + b * np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        return int(x.sum(dtype=np.uint64))


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError(f"as_bytes needs a contiguous tensor, got strides {tensor.stride()} for "
                         f"{tuple(tensor.shape)}")
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def block_sums_add_ref(block_sums: torch.Tensor, data: torch.Tensor, byte_offset: int) -> None:
    """The fallback of `FingerprintBlocks.add`: add the words of `data` (any contiguous tensor, its bytes placed at
    `byte_offset`, a multiple of 4) to `block_sums` ([nblocks] int64, uint64 bits, on the CPU) in place."""
    raw = as_bytes(data.contiguous())  # a strided tensor counts as its row-major bytes
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    words = raw.view(torch.int32)
    first_word = byte_offset // 4
    _, keys_lo, keys_hi = keys_on(words.device)
    acc = block_sums.numpy().view(np.uint64)
    for lo in range(0, words.numel(), _FALLBACK_CHUNK_WORDS):
        chunk = words[lo : lo + _FALLBACK_CHUNK_WORDS].to(torch.int64) & 0xFFFFFFFF  # w_i as int64 in [0, 2**32)
        start = first_word + lo
        lead = start % BLOCK_WORDS  # left-pad with zero words so the chunk starts on a block boundary
        total = lead + chunk.numel()
        padded = chunk.new_zeros(num_blocks(total * 4) * BLOCK_WORDS)
        padded[lead:total] = chunk
        padded = padded.view(-1, BLOCK_WORDS)  # [nb, 1024]
        # sum_j w * K_j = sum_j w * K_lo + (sum_j w * K_hi) << 16; each partial < 1024 * 2**48 = 2**58: exact.
        part_lo = (padded * keys_lo).sum(1).cpu().numpy().view(np.uint64)
        part_hi = (padded * keys_hi).sum(1).cpu().numpy().view(np.uint64)
        b0 = start // BLOCK_WORDS
        with np.errstate(over="ignore"):
            acc[b0 : b0 + len(part_lo)] += part_lo + (part_hi << np.uint64(16))


class FingerprintBlocks:
    """The per-block sums of one bucket-sized byte range, filled tensor by tensor (`add`), read with `value()`.

    `FingerprintBlocks(len(bucket.data)).add(bucket.data, 0).value()` is the bucket's fingerprint; a receiver adds
    each of its own tensors at its entry's offset instead and gets the same number when it holds the same bytes.
    """

    def __init__(self, nbytes: int, *, device: torch.device | str = "cpu", backend: str | None = None):
        from npo_engine.sync import ops

        self.nbytes = nbytes
        self.sums = torch.zeros(num_blocks(nbytes), dtype=torch.int64, device=device)
        self._ops = ops.get(backend)

    def add(self, data: torch.Tensor, byte_offset: int) -> FingerprintBlocks:
        if byte_offset % 4:
            raise ValueError(f"byte_offset must be a multiple of 4, got {byte_offset}")
        if byte_offset + data.numel() * data.element_size() > self.nbytes:
            raise ValueError(f"a tensor of {data.numel() * data.element_size()} bytes at offset {byte_offset} "
                             f"overruns the {self.nbytes}-byte range")
        self._ops.block_sums_add(self.sums, data, byte_offset)
        return self

    def value(self) -> int:
        return self._ops.combine(self.sums)


def bucket_fingerprint(data: torch.Tensor, *, backend: str | None = None) -> int:
    """fp of a contiguous tensor's bytes (a bucket's `data`), in [0, 2**64); see the module docstring."""
    nbytes = data.numel() * data.element_size()
    return FingerprintBlocks(nbytes, device=data.device, backend=backend).add(data, 0).value()
