// CUDA kernels of the weight-sync path: pack (many tensors cast and copied into one bucket in one launch) and the
// bucket fingerprint (per 4 KiB block sums, then the combine), specified in npo_engine/sync/fingerprints.py.
//
// Standalone on purpose: this file includes only the CUDA runtime and sync_cuda.h (the descriptors and launchers
// it shares with the torch binding, sync_cuda_binding.cpp), so CI compile-checks it with `nvcc -c` on a machine
// without a GPU or CUDA torch (tests/csrc/test_sync_ext.py). Casts follow c10 (round to nearest even; NaN -> 0x7FC0 for bf16).
//
// Launch shapes: pack, one thread block per copy piece (<= kPieceBytes of bucket); hash, one thread block per
// fingerprint block (owns sums[b], no atomics); combine, grid-stride with one 64-bit atomicAdd per thread block.
// Integer sums mod 2^64 are order-free, so the result is the same bits as the CPU kernels and the fallback.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "sync_cuda.h"

namespace {

constexpr int kBlockBytes = 4096;
constexpr int kBlockWords = kBlockBytes / 4;
constexpr int kThreads = 256;
constexpr unsigned long long kGolden = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN, as c10::BFloat16
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float bf16_to_f32(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
__device__ __forceinline__ uint16_t f32_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }
__device__ __forceinline__ float f16_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }

__device__ __forceinline__ float load_f32(const uint8_t* p, int type, int64_t i) {
  if (type == 0) return reinterpret_cast<const float*>(p)[i];
  uint16_t h = reinterpret_cast<const uint16_t*>(p)[i];
  return type == 1 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ unsigned long long block_reduce(unsigned long long v) {
  __shared__ unsigned long long partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0ull;
  if (threadIdx.x < 32)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return v;  // valid in thread 0
}

}  // namespace

__global__ void npo_pack_kernel(const NpoPackPiece* pieces) {
  const NpoPackPiece p = pieces[blockIdx.x];
  if (p.src == nullptr || p.src_type == p.dst_type || p.dst_type == 3) {
    int64_t bytes = p.count * (p.dst_type == 0 ? 4 : p.dst_type == 3 ? 1 : 2);
    bool vec = ((reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst) | bytes) & 15) == 0;
    if (vec) {
      const uint4* s = reinterpret_cast<const uint4*>(p.src);
      uint4* d = reinterpret_cast<uint4*>(p.dst);
      for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = p.src ? s[i] : make_uint4(0, 0, 0, 0);
    } else {
      for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) p.dst[i] = p.src ? p.src[i] : 0;
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < p.count; i += blockDim.x) {
    float v = load_f32(p.src, p.src_type, i);
    if (p.dst_type == 0) {
      reinterpret_cast<float*>(p.dst)[i] = v;
    } else {
      reinterpret_cast<uint16_t*>(p.dst)[i] = p.dst_type == 1 ? f32_to_bf16(v) : f32_to_f16(v);
    }
  }
}

// Block b = first_block + blockIdx.x: sums[b] += sum over the words of every range that falls in b of w * K_j.
// `ranges` are sorted by pos and do not overlap.
__global__ void npo_hash_kernel(const NpoHashRange* ranges, int nranges, const long long* keys,
                                unsigned long long* sums, int64_t first_block) {
  const int64_t b = first_block + blockIdx.x;
  const int64_t lo = b * kBlockBytes, hi = lo + kBlockBytes;
  int left = 0, right = nranges;  // first range with pos + len > lo
  while (left < right) {
    int mid = (left + right) / 2;
    if (ranges[mid].pos + ranges[mid].len > lo) right = mid; else left = mid + 1;
  }
  unsigned long long acc = 0;
  for (int r = left; r < nranges && ranges[r].pos < hi; ++r) {
    const NpoHashRange g = ranges[r];
    int64_t a = g.pos > lo ? g.pos : lo, e = g.pos + g.len < hi ? g.pos + g.len : hi;
    for (int64_t byte = a + 4 * threadIdx.x; byte < e; byte += 4 * blockDim.x) {
      const uint8_t* q = g.ptr + (byte - g.pos);
      uint32_t w;
      if (byte + 4 <= e && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
        w = *reinterpret_cast<const uint32_t*>(q);
      } else {  // a tail shorter than a word (zero-padded) or an unaligned tensor
        w = 0;
        for (int k = 0; k < 4 && byte + k < e; ++k) w |= static_cast<uint32_t>(q[k]) << (8 * k);
      }
      acc += static_cast<unsigned long long>(w) * static_cast<unsigned long long>(keys[(byte / 4) % kBlockWords]);
    }
  }
  acc = block_reduce(acc);
  if (threadIdx.x == 0) sums[b] += acc;
}

__global__ void npo_combine_kernel(const unsigned long long* sums, int64_t nblocks, unsigned long long* out) {
  unsigned long long acc = 0;
  for (int64_t b = blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += int64_t(gridDim.x) * blockDim.x)
    acc += mix64(sums[b] + static_cast<unsigned long long>(b + 1) * kGolden);
  acc = block_reduce(acc);
  if (threadIdx.x == 0) atomicAdd(out, acc);
}

extern "C" {

// pieces: device array of n pieces. Returns the launch error.
cudaError_t npo_sync_pack(const NpoPackPiece* pieces, int n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  npo_pack_kernel<<<n, kThreads, 0, stream>>>(pieces);
  return cudaGetLastError();
}

// ranges: device array sorted by pos; blocks [first_block, first_block + nblocks) of sums are updated.
cudaError_t npo_sync_hash(const NpoHashRange* ranges, int nranges, const long long* keys, unsigned long long* sums,
                          int64_t first_block, int64_t nblocks, cudaStream_t stream) {
  if (nblocks == 0 || nranges == 0) return cudaSuccess;
  npo_hash_kernel<<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(ranges, nranges, keys, sums, first_block);
  return cudaGetLastError();
}

// out: one device u64, zeroed by the caller; receives sum_b mix64(sums[b] + (b + 1) * golden).
cudaError_t npo_sync_combine(const unsigned long long* sums, int64_t nblocks, unsigned long long* out,
                             cudaStream_t stream) {
  int64_t grid = (nblocks + kThreads - 1) / kThreads;
  if (grid > 1024) grid = 1024;
  if (grid < 1) grid = 1;
  npo_combine_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(sums, nblocks, out);
  return cudaGetLastError();
}

}  // extern "C"
