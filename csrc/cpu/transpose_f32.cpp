// The float32 transposes around the fused forward and the padded input (transpose.h), with AVX2
// 8 x 8 register transposes where the CPU has AVX2. The blocked scalar transpose reads one element
// per cache line visited and cost ~1 ns an element: for c3's output, input and c5's weight that was
// 2-5 ms per call, as much as the sampling plan and a third of the fill.
#include <algorithm>

#include "cpu_isa.h"
#include "transpose.h"

namespace mmdet_dcnv2 {
namespace {

struct Transpose {
  const float* in;
  int64_t ld_in, rows, cols;
  float* out;
  int64_t ld_out;
  bool accumulate;
  const float* add;
  int64_t taps;

  // The output row of source column j: (j % taps) * (cols / taps) + j / taps.
  float* out_row(int64_t j) const { return out + (taps == 1 ? j : (j % taps) * (cols / taps) + j / taps) * ld_out; }

  void scalar(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    for (int64_t j = j0; j < j1; ++j) {
      float* o = out_row(j);
      for (int64_t i = i0; i < i1; ++i) {
        // (Only where add is given: x + 0.0f would turn -0.0f into +0.0f, which the AVX2 blocks do not.)
        const float v = add ? in[i * ld_in + j] + add[j] : in[i * ld_in + j];
        o[i] = accumulate ? o[i] + v : v;
      }
    }
  }
};

void transpose_baseline(const Transpose& t) {
  for (int64_t i0 = 0; i0 < t.rows; i0 += kTransposeBlock) {
    for (int64_t j0 = 0; j0 < t.cols; j0 += kTransposeBlock) {
      t.scalar(i0, std::min(t.rows, i0 + kTransposeBlock), j0, std::min(t.cols, j0 + kTransposeBlock));
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// A block of 8 x 8: rows i0.. of `in`, columns j0.. .
// out_rows: the output rows of columns j0..j0 + 7.
__attribute__((target("avx2,fma"), always_inline)) inline void transpose_8x8_avx2(const Transpose& t, int64_t i0,
                                                                                  int64_t j0, float* const* out_rows) {
  __m256 r[8], u[8], s[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(t.in + (i0 + k) * t.ld_in + j0);
  for (int k = 0; k < 8; k += 2) {
    u[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    u[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    s[k] = _mm256_shuffle_ps(u[k], u[k + 2], 0x44);
    s[k + 1] = _mm256_shuffle_ps(u[k], u[k + 2], 0xEE);
    s[k + 2] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0x44);
    s[k + 3] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
  }
  for (int k = 0; k < 8; ++k) {
    float* o = out_rows[k] + i0;
    __m256 v = r[k];
    if (t.add) v = _mm256_add_ps(v, _mm256_set1_ps(t.add[j0 + k]));
    if (t.accumulate) v = _mm256_add_ps(_mm256_loadu_ps(o), v);
    _mm256_storeu_ps(o, v);
  }
}

// Strips of kStrip columns, each swept over all rows: the strip's output rows are written from start
// to end while their lines are in L1, and each input line is read whole (sweeping all columns per 8
// rows instead wrote every output line in halves, evicted in between: 2x slower for c5's weight).
// The strip's output rows are looked up once (a division per row of 8 cost as much as the block).
constexpr int64_t kStrip = 64;

__attribute__((target("avx2,fma"))) void transpose_avx2(const Transpose& t) {
  for (int64_t jb = 0; jb < t.cols; jb += kStrip) {
    const int64_t je = std::min(t.cols, jb + kStrip), j_full = jb + (je - jb) / 8 * 8;
    float* out_rows[kStrip];
    for (int64_t j = jb; j < je; ++j) out_rows[j - jb] = t.out_row(j);
    int64_t i0 = 0;
    for (; i0 + 8 <= t.rows; i0 += 8) {
      for (int64_t j0 = jb; j0 < j_full; j0 += 8) transpose_8x8_avx2(t, i0, j0, out_rows + (j0 - jb));
      t.scalar(i0, i0 + 8, j_full, je);
    }
    t.scalar(i0, t.rows, jb, je);
  }
}
#endif

}  // namespace

void transpose_f32(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out,
                   bool accumulate, const float* add, int64_t taps) {
  const Transpose t{in, ld_in, rows, cols, out, ld_out, accumulate, add, taps};
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() != CpuIsa::kBaseline) return transpose_avx2(t);
#endif
  transpose_baseline(t);
}

}  // namespace mmdet_dcnv2
