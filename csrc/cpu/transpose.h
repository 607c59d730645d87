// Cache-blocked 2-D transposes between channels-last and channel-planar data, for the copies around
// the CPU kernels (input into the padded channels-last buffer, its gradient back, grad_output and the
// output to and from the pixel-major GEMM operands). ATen's copy_ of a transposed view walks one side
// element by element across cache lines; these go 16 x 16 blocks at a time, so every line read or
// written is used whole. Each element is written once, by one thread: deterministic.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace mmdet_dcnv2 {

constexpr int64_t kTransposeBlock = 16;

// out[j * out_j + i] op= in[i * in_i + j] for i < rows, j < cols: rows of `in` (stride in_i, unit
// stride along j) become columns of `out` (stride out_j, unit stride along i). op is = or +=.
template <bool kAccumulate, typename in_t, typename out_t>
inline void transpose_block(const in_t* in, int64_t in_i, out_t* out, int64_t out_j, int64_t rows, int64_t cols) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTransposeBlock) {
    const int64_t i1 = std::min(rows, i0 + kTransposeBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kTransposeBlock) {
      const int64_t j1 = std::min(cols, j0 + kTransposeBlock);
      for (int64_t j = j0; j < j1; ++j) {
        out_t* o = out + j * out_j;
        for (int64_t i = i0; i < i1; ++i) {
          const out_t v = static_cast<out_t>(in[i * in_i + j]);
          if constexpr (kAccumulate) {
            o[i] += v;
          } else {
            o[i] = v;
          }
        }
      }
    }
  }
}

// float32: out_row(j)[i] (+)= in[i * ld_in + j] (+ add[j] where add is given) for i < rows, j < cols,
// where out_row(j) = out + ((j % taps) * (cols / taps) + j / taps) * ld_out: a plain transpose for
// taps = 1, and for taps > 1 a (c, k) -> (k, c) reordering of the output rows as well (the weight into
// the columns' order in one pass). AVX2 register transposes where the CPU has them
// (transpose_f32.cpp); one thread. The same sums in any build: one addition per element, no FMA.
void transpose_f32(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out,
                   bool accumulate = false, const float* add = nullptr, int64_t taps = 1);

// Where a batch of transposes lies: `count` of them, `in`/`out` elements apart.
struct TransposeBatch {
  int64_t count, in, out;
};

// For each (outer, inner) batch: a (rows, cols) transpose as above, in parallel over batches and
// blocks of rows. taps > 1 (float32 only) reorders the output rows as transpose_f32 does.
template <bool kAccumulate, typename in_t, typename out_t>
void transpose_batched(const in_t* in, int64_t in_i, out_t* out, int64_t out_j, int64_t rows, int64_t cols,
                       TransposeBatch outer, TransposeBatch inner = {1, 0, 0}, int64_t taps = 1) {
  constexpr int64_t kRowsPerTask = kTransposeBlock * 4;
  const int64_t row_blocks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t per_batch = inner.count * row_blocks;
  // ~32K elements per task at least: smaller copies are not worth waking a thread for.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, cols * kRowsPerTask));
  at::parallel_for(0, outer.count * per_batch, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bo = t / per_batch, bi = (t % per_batch) / row_blocks, r0 = (t % row_blocks) * kRowsPerTask;
      const int64_t r1 = std::min(rows, r0 + kRowsPerTask);
      const in_t* src = in + bo * outer.in + bi * inner.in + r0 * in_i;
      out_t* dst = out + bo * outer.out + bi * inner.out + r0;
      if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
        transpose_f32(src, in_i, r1 - r0, cols, dst, out_j, kAccumulate, nullptr, taps);
      } else {
        TORCH_CHECK(taps == 1, "transpose_batched: reordering rows (taps > 1) is float32 only");
        transpose_block<kAccumulate>(src, in_i, dst, out_j, r1 - r0, cols);
      }
    }
  });
}

}  // namespace mmdet_dcnv2
