"""csrc/ (the weight-sync extension) against the PyTorch fallback and against the fingerprint's definition.

References: `fingerprint_spec`, a transcription of the definition in `npo_engine/sync/fingerprints.py` in plain
Python integers (no torch, no numpy), for the fingerprint; `Tensor.to` for the casts; the fallback (`TorchOps`)
for whole buckets, which must come out bit-identical from csrc/. CUDA tests (marked gpu) compare the CUDA kernels
with the CPU ones on the same bytes. The `.cu` file is compile-checked with the installed nvcc (no GPU needed).

Grid rationale: dtypes fp32/bf16/fp16 in both directions and unchanged; sizes odd (a bf16 tensor ending mid-word),
one element, and over one 256 KiB tile (so a tensor spans tiles and the tiles run in parallel); sources
transposed and sliced (non-contiguous); entries at offsets that cross 4 KiB fingerprint blocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npo_engine.rollout.base import BUCKET_ALIGN
from npo_engine.sync import ops
from npo_engine.sync.fingerprints import KEYS, FingerprintBlocks, bucket_fingerprint

CSRC = Path(__file__).resolve().parents[2] / "csrc"
M64 = (1 << 64) - 1


def fingerprint_spec(data: bytes) -> int:
    """The definition, word by word, in Python integers."""
    data = data + b"\0" * (-len(data) % 4)
    keys = [int(k) for k in KEYS]
    sums: dict[int, int] = {}
    for i in range(len(data) // 4):
        w = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        b, j = divmod(i, 1024)
        sums[b] = (sums.get(b, 0) + w * keys[j]) & M64
    total = 0
    for b in range(-(-len(data) // 4096)):
        x = (sums.get(b, 0) + (b + 1) * 0x9E3779B97F4A7C15) & M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
        total = (total + (x ^ (x >> 31))) & M64
    return total


@pytest.fixture(scope="module")
def csrc():
    kernels = ops.get("auto")
    if kernels.name != "csrc":
        pytest.skip(f"csrc/ did not build here: {ops.build_notes()}")
    return kernels


def make_sources(seed: int = 0) -> list[tuple[torch.Tensor, torch.dtype]]:
    """(source, bucket dtype) pairs covering the grid in the module docstring."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    return [
        (randn(37, 5), torch.bfloat16),                            # fp32 -> bf16, odd element count
        (randn(1001).to(torch.bfloat16), torch.bfloat16),           # unchanged bf16, ends mid-word
        (randn(7, 3).t(), torch.float16),                           # transposed fp32 -> fp16
        (randn(3), torch.float32),                                  # tiny
        (randn(1), torch.bfloat16),                                 # one element
        (randn(300, 700)[:, ::2], torch.float32),                   # sliced, > one tile, unchanged fp32
        (randn(513, 257).to(torch.float16), torch.bfloat16),        # fp16 -> bf16 over a tile
        (randn(999).to(torch.bfloat16), torch.float32),             # bf16 -> fp32
        (randn(12, 34).to(torch.float16), torch.float32),           # fp16 -> fp32
        (randn(5, 5).to(torch.bfloat16), torch.float16),            # bf16 -> fp16
        (torch.arange(77, dtype=torch.int64), torch.int64),         # a non-float buffer, copied as is
    ]


def layout(sources, gap: int = 0) -> tuple[list[int], int]:
    offsets, cursor = [], 0
    for src, dtype in sources:
        offsets.append(cursor)
        cursor += -(-(src.numel() * dtype.itemsize + gap) // BUCKET_ALIGN) * BUCKET_ALIGN
    return offsets, cursor + 3 * BUCKET_ALIGN  # a zero tail too


def pack_with(kernels, sources, offsets, size, device="cpu", fill=7):
    bucket = torch.full((size,), fill, dtype=torch.uint8, device=device)  # garbage the pack must overwrite
    views = [bucket[o : o + s.numel() * d.itemsize].view(d).view(s.shape) for (s, d), o in zip(sources, offsets)]
    sums = FingerprintBlocks(size, device=device, backend=kernels.name)
    kernels.pack([s.to(device) for s, _ in sources], views, bucket, sums.sums)
    return bucket, sums.value()


# ------------------------------------------------------------------------------------------------ the definition


@pytest.mark.parametrize("nbytes", [0, 1, 6, 4096, 4100, 3 * 4096 + 10])
@pytest.mark.parametrize("backend", ["torch", "csrc"])
def test_fingerprint_matches_its_definition(nbytes, backend, request):
    if backend == "csrc":
        request.getfixturevalue("csrc")
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    assert bucket_fingerprint(data, backend=backend) == fingerprint_spec(bytes(data.tolist()))


def test_keys_are_odd_32_bit():
    assert KEYS.dtype == torch.int64 and KEYS.numel() == 1024
    assert bool(((KEYS & 1) == 1).all()) and bool((KEYS < 2**32).all()) and len(set(KEYS.tolist())) == 1024


# ------------------------------------------------------------------------------------------- csrc == fallback


@pytest.mark.parametrize("gap", [0, 4000], ids=["packed", "gaps"])
def test_pack_csrc_equals_fallback(csrc, gap):
    sources = make_sources()
    offsets, size = layout(sources, gap)
    got, got_fp = pack_with(csrc, sources, offsets, size)
    want, want_fp = pack_with(ops.get("torch"), sources, offsets, size)
    assert torch.equal(got, want), f"first differing byte {int((got != want).nonzero()[0])}"
    assert got_fp == want_fp == fingerprint_spec(bytes(want.tolist()))
    # The bytes are the casts Tensor.to makes, and the gaps are zero.
    for (src, dtype), off in zip(sources, offsets):
        n = src.numel() * dtype.itemsize
        assert torch.equal(got[off : off + n].view(dtype), src.reshape(-1).to(dtype))
    used = torch.zeros(size, dtype=torch.bool)
    for (src, dtype), off in zip(sources, offsets):
        used[off : off + src.numel() * dtype.itemsize] = True
    assert int(got[~used].count_nonzero()) == 0


def test_unpack_csrc_equals_fallback_and_hashes_the_destinations(csrc):
    sources = make_sources(1)
    offsets, size = layout(sources, 100)
    bucket, sent = pack_with(csrc, sources, offsets, size)
    for kernels in (csrc, ops.get("torch")):
        views = [bucket[o : o + s.numel() * d.itemsize].view(d) for (s, d), o in zip(sources, offsets)]
        dsts = [torch.empty(s.numel(), dtype=d) for s, d in sources]
        sums = FingerprintBlocks(size, backend=kernels.name)
        kernels.unpack(bucket, views, dsts, sums.sums)
        assert sums.value() == sent, kernels.name
        for dst, (src, dtype) in zip(dsts, sources):
            assert torch.equal(dst, src.reshape(-1).to(dtype)), kernels.name


def test_receiver_fingerprint_of_held_tensors(csrc):
    """A receiver fingerprints its own tensors at their entries' offsets: equal to the bucket's while it holds
    the same bytes, different once one element of its copy drifts."""
    sources = make_sources(2)[:2]
    offsets, size = layout(sources)
    bucket, sent = pack_with(csrc, sources, offsets, size)
    assert bucket_fingerprint(bucket) == sent
    views = [bucket[o : o + s.numel() * d.itemsize].view(d) for (s, d), o in zip(sources, offsets)]
    # Per-tensor fingerprinting of the engine's own tensors at their offsets equals the bucket's.
    dsts = [torch.empty(s.numel(), dtype=d) for s, d in sources]
    csrc.unpack(bucket, views, dsts, None)
    blocks = FingerprintBlocks(size)
    for dst, off in zip(dsts, offsets):
        blocks.add(dst, off)
    assert blocks.value() == sent
    dsts[1][17] += 1  # the engine's copy drifts: its fingerprint no longer matches
    blocks = FingerprintBlocks(size)
    for dst, off in zip(dsts, offsets):
        blocks.add(dst, off)
    assert blocks.value() != sent


@pytest.mark.parametrize("backend", ["torch", "csrc"])
def test_per_tensor_sums_add_up_to_the_bucket(backend, request):
    if backend == "csrc":
        request.getfixturevalue("csrc")
    sources = make_sources(3)
    offsets, size = layout(sources, 1234)
    bucket, sent = pack_with(ops.get("torch"), sources, offsets, size)
    blocks = FingerprintBlocks(size, backend=backend)
    for (src, dtype), off in zip(sources, offsets):
        blocks.add(src.reshape(-1).to(dtype), off)
    assert blocks.value() == sent


# -------------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("backend", ["torch", "csrc"])
def test_one_flipped_bit_anywhere_is_caught(backend, request):
    if backend == "csrc":
        request.getfixturevalue("csrc")
    sources = make_sources(4)
    offsets, size = layout(sources, 64)
    bucket, sent = pack_with(ops.get("torch"), sources, offsets, size)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, size, (40,), generator=gen).tolist() + [0, size - 1, 4095, 4096]
    for pos in positions:
        for bit in (0, 7, int(torch.randint(0, 8, (1,), generator=gen))):
            damaged = bucket.clone()
            damaged[pos] ^= 1 << bit
            assert bucket_fingerprint(damaged, backend=backend) != sent, (pos, bit)


def test_swapped_words_and_moved_tensors_are_caught(csrc):
    sources = make_sources(5)[:3]
    offsets, size = layout(sources)
    bucket, sent = pack_with(csrc, sources, offsets, size)
    swapped = bucket.clone().view(torch.int32)
    swapped[[3, 10]] = swapped[[10, 3]]
    assert bucket_fingerprint(swapped) != sent
    shifted = torch.roll(bucket, BUCKET_ALIGN)  # the same tensors, one slot later
    assert bucket_fingerprint(shifted) != sent


# --------------------------------------------------------------------------------------------------- nvcc, CUDA


def test_cuda_source_compiles_standalone(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here")
    result = subprocess.run([nvcc, "-c", str(CSRC / "sync_cuda.cu"), "-o", str(tmp_path / "sync_cuda.o")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
def test_cuda_pack_and_fingerprints_equal_the_cpu_ones(csrc):
    if not ops.has_cuda_kernels():
        pytest.skip(f"the CUDA part did not build: {ops.build_notes()}")
    sources = make_sources(6)
    offsets, size = layout(sources, 300)
    cpu_bucket, cpu_fp = pack_with(csrc, sources, offsets, size)
    gpu_bucket, gpu_fp = pack_with(csrc, sources, offsets, size, device="cuda")
    assert torch.equal(gpu_bucket.cpu(), cpu_bucket)
    assert gpu_fp == cpu_fp == bucket_fingerprint(gpu_bucket) == bucket_fingerprint(gpu_bucket, backend="torch")
    views = [gpu_bucket[o : o + s.numel() * d.itemsize].view(d) for (s, d), o in zip(sources, offsets)]
    dsts = [torch.empty(s.numel(), dtype=d, device="cuda") for s, d in sources]
    sums = FingerprintBlocks(size, device="cuda")
    csrc.unpack(gpu_bucket, views, dsts, sums.sums)
    assert sums.value() == cpu_fp
    damaged = gpu_bucket.clone()
    damaged[size // 2] ^= 4
    assert bucket_fingerprint(damaged) != cpu_fp


def test_without_the_extension_the_fallback_runs_and_says_so_once():
    """NPO_SYNC_EXT=0 stands for a machine without a compiler: the sync still works, and the log says why once."""
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from npo_engine.sync import ops, bucket_fingerprint\n"
            "x = torch.arange(1000, dtype=torch.float32)\n"
            "assert ops.get().name == 'torch' and ops.get().name == 'torch'\n"
            "print(bucket_fingerprint(x))\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NPO_SYNC_EXT": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("using the PyTorch fallback") == 1 and "NPO_SYNC_EXT=0" in result.stderr
    x = torch.arange(1000, dtype=torch.float32)
    assert int(result.stdout.split()[-1]) == bucket_fingerprint(x)  # the same number as this process's kernels
