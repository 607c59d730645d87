// Launch helpers shared by the CUDA kernels: grid-stride loops over an item count, and the choice
// between 32- and 64-bit indices.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace mmdet_dcnv2 {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

inline int64_t blocks_for(int64_t items) {
  return std::max<int64_t>(1, std::min(kMaxBlocks, (items + kThreads - 1) / kThreads));
}

// 32-bit indices unless a tensor (or the item count) could overflow them. The margin leaves room for
// the grid-stride step (at most kThreads * kMaxBlocks = 2^28) on top of the largest index.
inline bool needs_wide_index(std::initializer_list<int64_t> sizes) {
  constexpr int64_t kLimit = (int64_t(1) << 31) - kThreads * kMaxBlocks - 1;
  return std::max(sizes) > kLimit;
}

}  // namespace mmdet_dcnv2
