// CPU kernels of the weight-sync path (npo_engine/sync): pack many tensors into one bucket, unpack a bucket into
// many tensors, and the bucket fingerprint, all in parallel over 256 KiB tiles of the bucket.
//
// The fingerprint is specified in npo_engine/sync/fingerprints.py (per 4 KiB block: S_b = sum_j w_j * K_j mod
// 2^64 over its 1024 little-endian uint32 words; fp = sum_b mix64(S_b + (b + 1) * golden)). Every function here
// gives the same bits as the PyTorch fallback there (tests/csrc/test_sync_ext.py checks it).
//
// Fusing the hash into the copy is what keeps verification cheap: each 4 KiB block is copied, then hashed while it is
// in L1, so the fingerprint costs arithmetic, not a second pass over memory. Unpack hashes the *destination*
// (the engine's own parameter memory) after writing it: the receiver's fingerprint is of what it holds.
//
// Built on first use by npo_engine/sync/ops.py (torch.utils.cpp_extension.load); casts use c10's BFloat16 and
// Half conversions, the ones Tensor.to uses, so packed bytes equal the fallback's bit for bit.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlockBytes = 4096;
constexpr int64_t kBlockWords = kBlockBytes / 4;
// Bytes of bucket per parallel task: 64 blocks, small enough to stay in L2 between copy and hash.
constexpr int64_t kTileBytes = 64 * kBlockBytes;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// sum_i w_i * keys[i] mod 2^64 over n whole words at p: the definition, one word at a time.
uint64_t dot_words_scalar(const uint8_t* p, int64_t n, const uint32_t* keys) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w;
    std::memcpy(&w, p + 4 * i, 4);
    s += static_cast<uint64_t>(w) * keys[i];
  }
  return s;
}

#if defined(__x86_64__)
// The same sum, 16 words per step: vpmuludq multiplies the even 32-bit lanes of words and keys into 64-bit
// products, and again after swapping each lane pair (vpshufd, off the shift port) for the odd lanes; four
// independent accumulators keep the multipliers busy. About 1.2x an 8-word loop with two accumulators and 1.7x
// the compiler's vectorization of the loop above (which zero-extends every word and key first) on this
// project's AVX2 machines.
__attribute__((target("avx2"))) uint64_t dot_words_avx2(const uint8_t* p, int64_t n, const uint32_t* keys) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4 * i));
    __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4 * i + 32));
    __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i + 8));
    a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(w0, k0));
    a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(_mm256_shuffle_epi32(w0, 0xB1), _mm256_shuffle_epi32(k0, 0xB1)));
    a2 = _mm256_add_epi64(a2, _mm256_mul_epu32(w1, k1));
    a3 = _mm256_add_epi64(a3, _mm256_mul_epu32(_mm256_shuffle_epi32(w1, 0xB1), _mm256_shuffle_epi32(k1, 0xB1)));
  }
  uint64_t lanes[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes),
                      _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + dot_words_scalar(p + 4 * i, n - i, keys + i);
}
#endif

uint64_t dot_words(const uint8_t* p, int64_t n, const uint32_t* keys) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return dot_words_avx2(p, n, keys);
#endif
  return dot_words_scalar(p, n, keys);
}

inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::vector<uint32_t> key_table(const torch::Tensor& keys) {
  TORCH_CHECK(keys.dtype() == torch::kInt64 && keys.numel() == kBlockWords && keys.is_contiguous(),
              "keys must be the [1024] int64 table of npo_engine.sync.fingerprint");
  auto k = keys.cpu();
  const int64_t* src = k.data_ptr<int64_t>();
  return std::vector<uint32_t>(src, src + kBlockWords);
}

// Adds bytes [p, p + len) placed at bucket byte position pos (a multiple of 4) to per-block sums: acc[b - b0]
// for block b. A partial last word is zero-padded.
void hash_range(const uint8_t* p, int64_t pos, int64_t len, const uint32_t* keys, uint64_t* acc, int64_t b0) {
  int64_t word = pos / 4, whole = len / 4;
  int64_t done = 0;
  while (done < whole) {
    int64_t b = (word + done) / kBlockWords, j = (word + done) % kBlockWords;
    int64_t n = std::min(whole - done, kBlockWords - j);
    acc[b - b0] += dot_words(p + 4 * done, n, keys + j);
    done += n;
  }
  if (len % 4) {
    uint32_t w = 0;
    std::memcpy(&w, p + 4 * whole, len % 4);
    int64_t at = word + whole;
    acc[at / kBlockWords - b0] += static_cast<uint64_t>(w) * keys[at % kBlockWords];
  }
}

template <typename D, typename S>
void cast_copy(D* dst, const S* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(static_cast<float>(src[i]));
}

// dst[0, n) = src[0, n) cast from st to dt (elements).
void convert(void* dst, at::ScalarType dt, const void* src, at::ScalarType st, int64_t n) {
  if (st == dt) {
    std::memcpy(dst, src, n * c10::elementSize(st));
    return;
  }
  using at::BFloat16;
  using at::Half;
#define NPO_CASE(DT, DTYPE, ST, STYPE)                                                  \
  if (dt == at::ScalarType::DT && st == at::ScalarType::ST) {                          \
    cast_copy(static_cast<DTYPE*>(dst), static_cast<const STYPE*>(src), n);            \
    return;                                                                            \
  }
  NPO_CASE(BFloat16, BFloat16, Float, float)
  NPO_CASE(Half, Half, Float, float)
  NPO_CASE(Float, float, BFloat16, BFloat16)
  NPO_CASE(Float, float, Half, Half)
  NPO_CASE(BFloat16, BFloat16, Half, Half)
  NPO_CASE(Half, Half, BFloat16, BFloat16)
#undef NPO_CASE
  TORCH_CHECK(false, "npo_sync pack: no cast from ", st, " to ", dt, " (floating types fp32/bf16/fp16 only)");
}

// One tensor's place in the bucket: bytes [begin, end) of the bucket, elements of `elem` bytes.
struct Seg {
  int64_t begin, end;
  char* ext;  // the tensor outside the bucket (source when packing, destination when unpacking)
  at::ScalarType ext_type;
  at::ScalarType bucket_type;
};

std::vector<Seg> segments(const std::vector<torch::Tensor>& outside, const std::vector<torch::Tensor>& inside,
                          const torch::Tensor& bucket) {
  TORCH_CHECK(outside.size() == inside.size(), "as many tensors as bucket views are needed");
  TORCH_CHECK(bucket.device().is_cpu() && bucket.dtype() == torch::kUInt8 && bucket.dim() == 1 &&
                  bucket.is_contiguous(), "the bucket must be a contiguous 1-D uint8 CPU tensor");
  const char* base = static_cast<const char*>(bucket.data_ptr());
  int64_t size = bucket.numel();
  std::vector<Seg> segs;
  segs.reserve(outside.size());
  for (size_t i = 0; i < outside.size(); ++i) {
    const auto& o = outside[i];
    const auto& v = inside[i];
    TORCH_CHECK(o.is_contiguous() && v.is_contiguous() && o.device().is_cpu() && v.device().is_cpu(),
                "tensor ", i, ": CPU and contiguous tensors only");
    TORCH_CHECK(o.numel() == v.numel(), "tensor ", i, ": ", o.numel(), " elements for a view of ", v.numel());
    int64_t begin = static_cast<const char*>(v.data_ptr()) - base;
    int64_t end = begin + v.numel() * static_cast<int64_t>(v.element_size());
    TORCH_CHECK(begin >= 0 && end <= size && begin % 4 == 0, "tensor ", i, ": its view is not inside the bucket "
                "at a multiple of 4 bytes");
    if (end > begin) segs.push_back({begin, end, static_cast<char*>(o.data_ptr()), o.scalar_type(), v.scalar_type()});
  }
  std::sort(segs.begin(), segs.end(), [](const Seg& a, const Seg& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < segs.size(); ++i)
    TORCH_CHECK(segs[i].begin >= segs[i - 1].end, "bucket views overlap");
  return segs;
}

// Runs f(tile_begin, tile_end, first segment overlapping it) over the bucket's tiles in parallel.
template <typename F>
void for_tiles(int64_t size, const std::vector<Seg>& segs, F f) {
  int64_t tiles = (size + kTileBytes - 1) / kTileBytes;
  at::parallel_for(0, tiles, 1, [&](int64_t t_lo, int64_t t_hi) {
    for (int64_t t = t_lo; t < t_hi; ++t) {
      int64_t a = t * kTileBytes, b = std::min(size, a + kTileBytes);
      auto it = std::upper_bound(segs.begin(), segs.end(), a, [](int64_t x, const Seg& s) { return x < s.end; });
      f(a, b, it);
    }
  });
}

uint64_t* sums_ptr(const c10::optional<torch::Tensor>& sums, int64_t size) {
  if (!sums.has_value()) return nullptr;
  const auto& s = *sums;
  TORCH_CHECK(s.device().is_cpu() && s.dtype() == torch::kInt64 && s.is_contiguous() &&
                  s.numel() == (size + kBlockBytes - 1) / kBlockBytes,
              "sums must be a contiguous int64 CPU tensor of one entry per 4 KiB block of the bucket");
  return reinterpret_cast<uint64_t*>(s.data_ptr<int64_t>());
}

}  // namespace

// Casts and copies srcs[i] into views[i] (views of `bucket`), zeroes every other byte of the bucket, and, with
// `sums`, adds the bucket's per-block fingerprint sums (of the bytes written) to it.
void pack(const std::vector<torch::Tensor>& srcs, const std::vector<torch::Tensor>& views, torch::Tensor bucket,
          c10::optional<torch::Tensor> sums, torch::Tensor keys) {
  auto segs = segments(srcs, views, bucket);
  uint64_t* acc = sums_ptr(sums, bucket.numel());
  auto table = key_table(keys);
  uint8_t* base = bucket.data_ptr<uint8_t>();
  for_tiles(bucket.numel(), segs, [&](int64_t tile_a, int64_t tile_b, std::vector<Seg>::const_iterator it) {
    // Block by block, so each 4 KiB block is hashed straight after it is written, from L1.
    for (int64_t a = tile_a; a < tile_b; a += kBlockBytes) {
      int64_t b = std::min(tile_b, a + kBlockBytes), cursor = a;
      while (it != segs.end() && it->end <= a) ++it;
      for (auto s = it; s != segs.end() && s->begin < b; ++s) {
        int64_t lo = std::max(a, s->begin), hi = std::min(b, s->end);
        if (lo > cursor) std::memset(base + cursor, 0, lo - cursor);
        int64_t in_size = c10::elementSize(s->bucket_type), ex_size = c10::elementSize(s->ext_type);
        int64_t first = (lo - s->begin) / in_size, count = (hi - lo) / in_size;
        convert(base + lo, s->bucket_type, s->ext + first * ex_size, s->ext_type, count);
        cursor = hi;
      }
      if (b > cursor) std::memset(base + cursor, 0, b - cursor);
      if (acc) acc[a / kBlockBytes] += dot_words(base + a, (b - a) / 4, table.data());
    }
  });
}

// Copies views[i] (of `bucket`) into dsts[i] (same dtype), and, with `sums`, adds the per-block fingerprint sums
// of the destinations' bytes, read back after the copy and placed at their views' offsets.
void unpack(torch::Tensor bucket, const std::vector<torch::Tensor>& views, const std::vector<torch::Tensor>& dsts,
            c10::optional<torch::Tensor> sums, torch::Tensor keys) {
  auto segs = segments(dsts, views, bucket);
  for (const auto& s : segs)
    TORCH_CHECK(s.ext_type == s.bucket_type, "unpack copies without casting: a destination of type ", s.ext_type,
                " for a bucket entry of type ", s.bucket_type);
  uint64_t* acc = sums_ptr(sums, bucket.numel());
  auto table = key_table(keys);
  const uint8_t* base = bucket.data_ptr<uint8_t>();
  for_tiles(bucket.numel(), segs, [&](int64_t tile_a, int64_t tile_b, std::vector<Seg>::const_iterator it) {
    // Block by block: each destination piece is hashed straight after it is written, from L1.
    for (int64_t a = tile_a; a < tile_b; a += kBlockBytes) {
      int64_t b = std::min(tile_b, a + kBlockBytes);
      uint64_t local = 0;
      while (it != segs.end() && it->end <= a) ++it;
      for (auto s = it; s != segs.end() && s->begin < b; ++s) {
        int64_t lo = std::max(a, s->begin), hi = std::min(b, s->end);
        char* dst = s->ext + (lo - s->begin);
        std::memcpy(dst, base + lo, hi - lo);
        if (acc) hash_range(reinterpret_cast<const uint8_t*>(dst), lo, hi - lo, table.data(), &local, a / kBlockBytes);
      }
      if (acc) acc[a / kBlockBytes] += local;
    }
  });
}

// Adds the fingerprint sums of `data`'s bytes, placed at bucket byte position `byte_offset`, to `sums`.
void block_sums_add(torch::Tensor sums, torch::Tensor data, int64_t byte_offset, torch::Tensor keys) {
  TORCH_CHECK(data.is_contiguous() && data.device().is_cpu(), "block_sums_add: a contiguous CPU tensor");
  TORCH_CHECK(byte_offset % 4 == 0, "block_sums_add: byte_offset must be a multiple of 4");
  TORCH_CHECK(sums.device().is_cpu() && sums.dtype() == torch::kInt64 && sums.is_contiguous(), "sums: int64 CPU");
  auto table = key_table(keys);
  const uint8_t* p = static_cast<const uint8_t*>(data.data_ptr());
  int64_t len = data.numel() * static_cast<int64_t>(data.element_size());
  TORCH_CHECK((byte_offset + len + kBlockBytes - 1) / kBlockBytes <= sums.numel(), "block_sums_add: sums too short");
  uint64_t* acc = reinterpret_cast<uint64_t*>(sums.data_ptr<int64_t>());
  // Parallel over the blocks the range covers; each task owns whole blocks, so no two add to one entry.
  int64_t first_block = byte_offset / kBlockBytes, last_block = (byte_offset + len - 1) / kBlockBytes;
  if (len == 0) return;
  at::parallel_for(first_block, last_block + 1, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      int64_t a = std::max(byte_offset, blk * kBlockBytes), e = std::min(byte_offset + len, (blk + 1) * kBlockBytes);
      uint64_t local = 0;
      hash_range(p + (a - byte_offset), a, e - a, table.data(), &local, blk);
      acc[blk] += local;
    }
  });
}

// fp from the per-block sums (see the file header); returned as the int64 with the same bits.
int64_t combine(torch::Tensor sums) {
  TORCH_CHECK(sums.device().is_cpu() && sums.dtype() == torch::kInt64 && sums.is_contiguous(), "sums: int64 CPU");
  const uint64_t* s = reinterpret_cast<const uint64_t*>(sums.data_ptr<int64_t>());
  uint64_t total = 0;
  for (int64_t b = 0; b < sums.numel(); ++b) total += mix64(s[b] + static_cast<uint64_t>(b + 1) * kGolden);
  return static_cast<int64_t>(total);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "npo_engine weight sync: bucket pack/unpack with fused fingerprints (CPU)";
  m.def("pack", &pack, "cast+copy tensors into a bucket, zero the rest, optional fingerprint sums");
  m.def("unpack", &unpack, "copy a bucket into tensors, optional fingerprint sums of the destinations");
  m.def("block_sums_add", &block_sums_add, "fingerprint sums of one tensor at a bucket offset");
  m.def("combine", &combine, "fingerprint from per-block sums");
}
