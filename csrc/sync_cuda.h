// The interface between sync_cuda.cu (the kernels, compiled by nvcc alone) and sync_cuda_binding.cpp (the torch
// binding): the descriptors both sides lay out in memory, and the launchers. One definition, so they cannot drift.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// One piece of a pack: `count` elements from src (type src_type) to dst (type dst_type); src == 0 writes zeros
// (`count` bytes, dst_type 3). Types: 0 fp32, 1 bf16, 2 fp16, 3 raw bytes (copy without cast).
struct NpoPackPiece {
  const uint8_t* src;
  uint8_t* dst;
  int64_t count;
  int32_t src_type;
  int32_t dst_type;
};

// A range of bytes to fingerprint: `len` bytes at `ptr`, placed at bucket byte `pos` (a multiple of 4).
struct NpoHashRange {
  const uint8_t* ptr;
  int64_t pos;
  int64_t len;
};

extern "C" {
cudaError_t npo_sync_pack(const NpoPackPiece* pieces, int n, cudaStream_t stream);
cudaError_t npo_sync_hash(const NpoHashRange* ranges, int nranges, const long long* keys, unsigned long long* sums,
                          int64_t first_block, int64_t nblocks, cudaStream_t stream);
cudaError_t npo_sync_combine(const unsigned long long* sums, int64_t nblocks, unsigned long long* out,
                             cudaStream_t stream);
}
