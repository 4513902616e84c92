// Torch binding of sync_cuda.cu: the same functions as sync_cpu.cpp (pack, unpack, block_sums_add) for CUDA
// tensors, plus `fingerprint` (sums and combine on the device; 8 bytes come back). Descriptors are built here
// on the host and copied to the device with the launch's stream.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "sync_cuda.h"


namespace {

constexpr int64_t kBlockBytes = 4096;
// Bytes of bucket per pack piece (one thread block): large enough to amortize a block, small enough to spread.
constexpr int64_t kPieceBytes = 256 * 1024;

int type_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

template <typename T>
torch::Tensor to_device(const std::vector<T>& items, const torch::Device& device) {
  auto host = torch::empty({static_cast<int64_t>(items.size() * sizeof(T))},
                           torch::dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(host.data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "npo_sync ", what, ": ", cudaGetErrorString(err));
}

void check_sums(const torch::Tensor& sums, const torch::Tensor& bucket_like, int64_t nbytes) {
  TORCH_CHECK(sums.device() == bucket_like.device() && sums.dtype() == torch::kInt64 && sums.is_contiguous() &&
                  sums.numel() >= (nbytes + kBlockBytes - 1) / kBlockBytes,
              "sums must be a contiguous int64 tensor on the bucket's device, one entry per 4 KiB block");
}

void hash_ranges(std::vector<NpoHashRange> ranges, torch::Tensor sums, const torch::Tensor& keys,
                 const torch::Device& device, cudaStream_t stream) {
  if (ranges.empty()) return;
  std::sort(ranges.begin(), ranges.end(), [](const NpoHashRange& a, const NpoHashRange& b) { return a.pos < b.pos; });
  int64_t first = ranges.front().pos / kBlockBytes;
  int64_t last = first;
  for (const auto& r : ranges) last = std::max(last, (r.pos + std::max<int64_t>(r.len, 1) - 1) / kBlockBytes);
  auto dev = to_device(ranges, device);
  check(npo_sync_hash(reinterpret_cast<const NpoHashRange*>(dev.data_ptr()), static_cast<int>(ranges.size()),
                      reinterpret_cast<const long long*>(keys.data_ptr<int64_t>()),
                      reinterpret_cast<unsigned long long*>(sums.data_ptr<int64_t>()), first, last - first + 1,
                      stream), "hash");
}

}  // namespace

void pack(const std::vector<torch::Tensor>& srcs, const std::vector<torch::Tensor>& views, torch::Tensor bucket,
          c10::optional<torch::Tensor> sums, torch::Tensor keys) {
  TORCH_CHECK(bucket.is_cuda() && bucket.dtype() == torch::kUInt8 && bucket.dim() == 1 && bucket.is_contiguous(),
              "the bucket must be a contiguous 1-D uint8 CUDA tensor");
  TORCH_CHECK(srcs.size() == views.size(), "as many tensors as bucket views are needed");
  c10::cuda::CUDAGuard guard(bucket.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  uint8_t* base = bucket.data_ptr<uint8_t>();
  const int64_t size = bucket.numel();
  // Pieces of every copy, then zero pieces for the gaps between views.
  std::vector<std::pair<int64_t, int64_t>> used;
  std::vector<NpoPackPiece> pieces;
  for (size_t i = 0; i < srcs.size(); ++i) {
    const auto& s = srcs[i];
    const auto& v = views[i];
    TORCH_CHECK(s.is_cuda() && s.device() == bucket.device() && s.is_contiguous() && v.is_contiguous(),
                "tensor ", i, ": contiguous, on the bucket's device");
    TORCH_CHECK(s.numel() == v.numel(), "tensor ", i, ": ", s.numel(), " elements for a view of ", v.numel());
    int64_t begin = static_cast<uint8_t*>(v.data_ptr()) - base;
    int64_t esize = v.element_size(), ssize = s.element_size();
    TORCH_CHECK(begin >= 0 && begin + v.numel() * esize <= size, "tensor ", i, ": its view is not inside the bucket");
    int st = type_code(s.scalar_type()), dt = type_code(v.scalar_type());
    bool raw = s.scalar_type() == v.scalar_type();
    TORCH_CHECK(raw || (st != 3 && dt != 3), "tensor ", i, ": no cast from ", s.scalar_type(), " to ",
                v.scalar_type());
    int64_t per_piece = kPieceBytes / esize;
    for (int64_t e = 0; e < v.numel(); e += per_piece) {
      int64_t n = std::min(per_piece, v.numel() - e);
      if (raw) {
        pieces.push_back({static_cast<const uint8_t*>(s.data_ptr()) + e * ssize,
                          static_cast<uint8_t*>(v.data_ptr()) + e * esize, n * esize, 3, 3});
      } else {
        pieces.push_back({static_cast<const uint8_t*>(s.data_ptr()) + e * ssize,
                          static_cast<uint8_t*>(v.data_ptr()) + e * esize, n, st, dt});
      }
    }
    used.emplace_back(begin, begin + v.numel() * esize);
  }
  std::sort(used.begin(), used.end());
  int64_t cursor = 0;
  used.emplace_back(size, size);
  for (const auto& u : used) {
    TORCH_CHECK(u.first >= cursor, "bucket views overlap");
    for (int64_t a = cursor; a < u.first; a += kPieceBytes)
      pieces.push_back({nullptr, base + a, std::min(kPieceBytes, u.first - a), 3, 3});
    cursor = u.second;
  }
  if (!pieces.empty()) {
    auto dev = to_device(pieces, bucket.device());
    check(npo_sync_pack(reinterpret_cast<const NpoPackPiece*>(dev.data_ptr()), static_cast<int>(pieces.size()),
                        stream), "pack");
  }
  if (sums.has_value()) {
    check_sums(*sums, bucket, size);
    hash_ranges({{base, 0, size}}, *sums, keys, bucket.device(), stream);
  }
}

void unpack(torch::Tensor bucket, const std::vector<torch::Tensor>& views, const std::vector<torch::Tensor>& dsts,
            c10::optional<torch::Tensor> sums, torch::Tensor keys) {
  TORCH_CHECK(bucket.is_cuda() && bucket.dtype() == torch::kUInt8 && bucket.is_contiguous(), "bucket: uint8 CUDA");
  TORCH_CHECK(views.size() == dsts.size(), "as many destinations as bucket views are needed");
  c10::cuda::CUDAGuard guard(bucket.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* base = bucket.data_ptr<uint8_t>();
  std::vector<NpoPackPiece> pieces;
  std::vector<NpoHashRange> ranges;
  for (size_t i = 0; i < views.size(); ++i) {
    const auto& v = views[i];
    const auto& d = dsts[i];
    TORCH_CHECK(d.is_cuda() && d.device() == bucket.device() && d.is_contiguous() && d.numel() == v.numel() &&
                    d.scalar_type() == v.scalar_type(), "destination ", i, ": contiguous, same device, size and dtype");
    int64_t bytes = v.numel() * v.element_size();
    for (int64_t a = 0; a < bytes; a += kPieceBytes)
      pieces.push_back({static_cast<const uint8_t*>(v.data_ptr()) + a, static_cast<uint8_t*>(d.data_ptr()) + a,
                        std::min(kPieceBytes, bytes - a), 3, 3});
    ranges.push_back({static_cast<const uint8_t*>(d.data_ptr()), static_cast<const uint8_t*>(v.data_ptr()) - base,
                      bytes});
  }
  if (!pieces.empty()) {
    auto dev = to_device(pieces, bucket.device());
    check(npo_sync_pack(reinterpret_cast<const NpoPackPiece*>(dev.data_ptr()), static_cast<int>(pieces.size()),
                        stream), "unpack");
  }
  if (sums.has_value()) {
    check_sums(*sums, bucket, bucket.numel());
    hash_ranges(std::move(ranges), *sums, keys, bucket.device(), stream);  // the destinations, after the copy
  }
}

void block_sums_add(torch::Tensor sums, torch::Tensor data, int64_t byte_offset, torch::Tensor keys) {
  TORCH_CHECK(data.is_cuda() && data.is_contiguous() && byte_offset % 4 == 0, "data: contiguous CUDA, offset % 4 == 0");
  c10::cuda::CUDAGuard guard(data.device());
  int64_t len = data.numel() * data.element_size();
  check_sums(sums, data, byte_offset + len);
  if (len == 0) return;
  hash_ranges({{static_cast<const uint8_t*>(data.data_ptr()), byte_offset, len}}, sums, keys, data.device(),
              at::cuda::getCurrentCUDAStream());
}

int64_t combine(torch::Tensor sums) {
  TORCH_CHECK(sums.is_cuda() && sums.dtype() == torch::kInt64 && sums.is_contiguous(), "sums: int64 CUDA");
  c10::cuda::CUDAGuard guard(sums.device());
  auto out = torch::zeros({1}, sums.options());
  check(npo_sync_combine(reinterpret_cast<const unsigned long long*>(sums.data_ptr<int64_t>()), sums.numel(),
                         reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()),
                         at::cuda::getCurrentCUDAStream()), "combine");
  return out.item<int64_t>();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "npo_engine weight sync: bucket pack/unpack and fingerprints (CUDA)";
  m.def("pack", &pack);
  m.def("unpack", &unpack);
  m.def("block_sums_add", &block_sums_add);
  m.def("combine", &combine);
}
