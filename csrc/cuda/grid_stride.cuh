// Launch helpers shared by the CUDA kernels: grid-stride loops over an item count, the choice
// between 32- and 64-bit indices, the launch itself, and the lookup of the deterministic gathers.
//
// The kernels also compile for the host, for the test-only host-run build (host_emulation.h, which
// then defines DCN_LAUNCH and the test hooks below); in the CUDA build these are plain <<<>>>
// launches and constants.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#ifndef MMDET_DCNV2_HOST_EMULATION
// kernel<<<grid, block, 0, stream>>>: DCN_LAUNCH(grid, block, stream, kernel<T...>)(args...).
#define DCN_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define DCN_CUDA_DISPATCH_KEY CUDA
#define DCN_LAUNCH_MAX_BLOCKS() int64_t(0)
#define DCN_FORCE_WIDE_INDEX() false
#endif

namespace mmdet_dcnv2 {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

inline int64_t blocks_for(int64_t items) {
  // A test of the host-run build may cap the grid lower, so that every grid-stride loop repeats.
  const int64_t cap = DCN_LAUNCH_MAX_BLOCKS() > 0 ? std::min(kMaxBlocks, DCN_LAUNCH_MAX_BLOCKS()) : kMaxBlocks;
  return std::max<int64_t>(1, std::min(cap, (items + kThreads - 1) / kThreads));
}

// 32-bit indices unless a tensor (or the item count) could overflow them. The margin leaves room for
// the grid-stride step (at most kThreads * kMaxBlocks = 2^28) on top of the largest index.
inline bool needs_wide_index(std::initializer_list<int64_t> sizes) {
  constexpr int64_t kLimit = (int64_t(1) << 31) - kThreads * kMaxBlocks - 1;
  return DCN_FORCE_WIDE_INDEX() || std::max(sizes) > kLimit;
}

// Runs fn with a zero of the index type to instantiate the kernels for: int64_t where `wide` (see
// needs_wide_index), int32_t otherwise. fn is a generic lambda that starts with
// `using index_t = decltype(index_zero);`; both instantiations are compiled, one runs.
template <typename Fn>
void with_index_type(bool wide, Fn&& fn) {
  if (wide) {
    fn(int64_t(0));
  } else {
    fn(int32_t(0));
  }
}

// The deterministic gathers' lookup: the first of `entries` ascending keys that is >= key (entries
// where there is none).
__device__ __forceinline__ int64_t first_entry(const int64_t* sorted_keys, int64_t entries, int64_t key) {
  int64_t lo = 0, hi = entries;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace mmdet_dcnv2
