// Modulated deformable convolution on the CPU, under the chunked GEMM driver of deform_conv.cpp.
//
// The input is copied once into a zero-padded channels-last buffer, and the columns are pixel-major
// (ColumnLayout::kPixelMajor): per output pixel and kernel point, the channels of a group are
// contiguous both where they are read and where they are written. A sampling plan is built once per
// (output pixel, deform group, kernel point) -- the padded position of the sample's top-left corner
// and its four bilinear weights (zero_border_padded in dcn_common.h) -- and every channel reuses it:
// each sample is four unit-stride loads and multiply-adds over the channels, which the compiler
// vectorises. (The incumbents gather one channel at a time with the weights recomputed per channel;
// a gather per sample is what made our earlier channel-major fill cost as much as the GEMM.)
//
// Backward: grad_input is a scatter through the same plan into a padded channels-last gradient kept
// in blocks of channels, in parallel over (image, channel block) so that each thread owns the channels
// -- and the memory -- it writes; grad_offset
// and grad_mask are four dot products over a group's channels per sample, with fixed-width partial
// sums. No atomics: results are bitwise identical run to run, whatever the thread count (ATen's GEMMs
// aside, which may round differently at other thread counts).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include "../deform_conv.h"
#include "cpu_isa.h"
#include "transpose.h"

// The hot loops are compiled three times -- x86-64 baseline, AVX2 + FMA, AVX-512 -- from one body
// marked always-inline (with its helpers and lambdas), each copy inside a function carrying a target
// attribute, so the compiler vectorises every copy for its ISA; cpu_isa() picks one per call. Only the
// wrappers carry targets: an out-of-line copy of an inline helper is baseline code, so no
// AVX instruction can leak into the baseline path through the linker's choice of one definition.
#if defined(__x86_64__) && defined(__GNUC__)
#define DCN_MULTI_ISA 1
#define DCN_INLINE __attribute__((always_inline)) inline
#define DCN_LAMBDA_INLINE __attribute__((always_inline))
#define DCN_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2,f16c")))
#define DCN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2,f16c")))
#else
#define DCN_MULTI_ISA 0
#define DCN_INLINE inline
#define DCN_LAMBDA_INLINE
#define DCN_TARGET_AVX2
#define DCN_TARGET_AVX512
#endif

namespace mmdet_dcnv2 {
namespace {

// Columns per tile: the GEMM then reads the columns from cache, and the buffer is small enough that
// reusing it costs no page faults (measured: a fresh 70 MB buffer per call costs ~10% of a c3 forward).
constexpr int64_t kTileBytes = int64_t(4) << 20;
// ... but never fewer columns than keep the GEMM efficient (wide layers such as c5 need the larger tile).
constexpr int64_t kMinTileColumns = 512;
// The fused forward's blocks: the brgemm's A is kFusedRows pixels (one fixed M, so a layer needs
// few kernels: ATen caches one per shape and thread), a task holds at most kFusedBlockPixels pixels,
// a chunk about kFusedChunkColumns values per pixel and a call at most kFusedOutColumns outputs, so
// that A (<= 256 x 512 floats), B's block (512 x 256) and the accumulators stay in a core's cache.
// Measured at c3-c5 with one thread (a blocked brgemm against at::mm on the same operands):
// 64 x 256 x 512 blocks ran 3-7% faster than MKL's sgemm, an unblocked c5 call 7x slower.
constexpr int64_t kFusedRows = 64;
constexpr int64_t kFusedBlockPixels = 256;
constexpr int64_t kFusedChunkColumns = 512;
constexpr int64_t kFusedOutColumns = 256;
// Samples a thread should have at least before another one is woken: waking threads for a tiny
// layer costs more than the work (seen: a 10x slower gradcheck on a busy machine).
constexpr int64_t kMinSamplesPerThread = int64_t(1) << 14;
// Channels per task of the grad_input scatter: at least this many (whole cache lines of float).
constexpr int64_t kMinChannelBlock = 16;
// Partial sums per dot product: fixed, so the reduction order (and the result) never depends on
// the machine, and wide enough for the compiler to keep them in one vector register.
constexpr int kLanes = 8;

// The widest ISA each loop runs where the CPU has it: a level is kept only where it beat the one
// below (benchmarks/bench_cpu_isa.py, docs/performance.md; one thread, Sapphire Rapids Xeon). AVX2 +
// FMA beats the baseline in all the loops (c3 float32: dot products 16 vs 26 ms, fill 12.5 vs
// 16.5, scatter 20 vs 23). AVX-512 beats AVX2 in the scatter (float32 5-9% at c3-c5, bfloat16 12%)
// and in the fill: bfloat16 by 26% (the conversions), float32 by 2-4% of the fused forward at c3-c4
// (where the fill writes into the core's cache; ~12% fewer samples of the fill itself in `perf`);
// float16 and float64 fills, not measured, stay at AVX2.
// The sampling plan (perf: fewer samples in AVX2) and the dot products (no faster: they wait on
// memory) stay at AVX2; their AVX-512 builds are compiled and testable (MMDET_DCNV2_CPU_ISA).
template <typename scalar_t>
constexpr CpuIsa kFillIsa =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ? CpuIsa::kAvx512 : CpuIsa::kAvx2;
constexpr CpuIsa kScatterIsa = CpuIsa::kAvx512;
constexpr CpuIsa kPlanIsa = CpuIsa::kAvx2;
constexpr CpuIsa kDotsIsa = CpuIsa::kAvx2;

// The level a loop runs: MMDET_DCNV2_CPU_ISA's where set (any build, for tests and measurements),
// else the CPU's, up to the widest level kept for that loop.
inline CpuIsa loop_isa(CpuIsa widest_kept) {
  const CpuIsa isa = cpu_isa();
  if (cpu_isa_overridden()) return isa;
  return static_cast<int>(isa) < static_cast<int>(widest_kept) ? isa : widest_kept;
}

// NAME_baseline/_avx2/_avx512: the member NAME_body compiled for each ISA.
#define DCN_ISA_VARIANTS(NAME, PARAMS, ARGS)                    \
  void NAME##_baseline PARAMS { NAME##_body ARGS; }             \
  DCN_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_body ARGS; } \
  DCN_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_body ARGS; }

#define DCN_ISA_CALL(ISA, NAME, ARGS) \
  switch (ISA) {                      \
    case CpuIsa::kAvx512:             \
      NAME##_avx512 ARGS;             \
      break;                          \
    case CpuIsa::kAvx2:               \
      NAME##_avx2 ARGS;               \
      break;                          \
    default:                          \
      NAME##_baseline ARGS;           \
  }

// Grain size for at::parallel_for over tasks of `samples_per_task` samples each.
inline int64_t grain_for(int64_t samples_per_task) {
  return std::max<int64_t>(1, kMinSamplesPerThread / std::max<int64_t>(1, samples_per_task));
}

// One sample for n consecutive channels: out[i] = sum_j w[j] * x_j[i], x_j the four corners, which
// lie `right` and `down` elements apart.
template <typename scalar_t, typename acc_t>
DCN_INLINE void sample_channels(const scalar_t* __restrict__ x, int64_t n, int64_t right, int64_t down,
                                const acc_t w[4], scalar_t* __restrict__ out) {
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const scalar_t* __restrict__ x1 = x + right;
  const scalar_t* __restrict__ x2 = x + down;
  const scalar_t* __restrict__ x3 = x + down + right;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(w0 * static_cast<acc_t>(x[i]) + w1 * static_cast<acc_t>(x1[i]) +
                                   w2 * static_cast<acc_t>(x2[i]) + w3 * static_cast<acc_t>(x3[i]));
  }
}

// The transpose of sample_channels: gx_j[i] += w[j] * grad[i] for the four corners (disjoint ranges:
// n never exceeds `right`, the pixel stride of the gradient's block of channels).
template <typename scalar_t, typename acc_t>
DCN_INLINE void scatter_channels(const scalar_t* __restrict__ grad, int64_t n, int64_t right, int64_t down,
                                 const acc_t w[4], acc_t* gx) {
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  acc_t* __restrict__ g0 = gx;
  acc_t* __restrict__ g1 = gx + right;
  acc_t* __restrict__ g2 = gx + down;
  acc_t* __restrict__ g3 = gx + down + right;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gi = static_cast<acc_t>(grad[i]);
    g0[i] += w0 * gi;
    g1[i] += w1 * gi;
    g2[i] += w2 * gi;
    g3[i] += w3 * gi;
  }
}

// kLanes partial sums as one GCC vector (one AVX2 register of float; the compiler splits it where
// the ISA is narrower). Named vector variables stay in registers, where an array of partial sums
// was kept on the stack with a store-to-load round trip per step (measured: the loop ran ~3x slower).
template <typename acc_t>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename acc_t>
using Lanes = typename LanesOf<acc_t>::type;

// (Through a reference: returning a vector type would warn of an ABI that differs between ISAs.)
template <typename scalar_t, typename acc_t>
DCN_INLINE void load_lanes(const scalar_t* p, Lanes<acc_t>& v) {
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<acc_t>(p[l]);
}

// dots[j] += sum_i grad[i] * x_j[i] over n consecutive channels, for the four corners. Channel i
// always goes to partial sum i % kLanes, whatever the ISA: the same sums in the same order.
template <typename scalar_t, typename acc_t>
DCN_INLINE void corner_dots(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, int64_t n, int64_t right,
                            int64_t down, acc_t dots[4]) {
  const scalar_t* __restrict__ x1 = x + right;
  const scalar_t* __restrict__ x2 = x + down;
  const scalar_t* __restrict__ x3 = x + down + right;
  Lanes<acc_t> a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Lanes<acc_t> g, v0, v1, v2, v3;
    load_lanes<scalar_t, acc_t>(grad + i, g);
    load_lanes<scalar_t, acc_t>(x + i, v0);
    load_lanes<scalar_t, acc_t>(x1 + i, v1);
    load_lanes<scalar_t, acc_t>(x2 + i, v2);
    load_lanes<scalar_t, acc_t>(x3 + i, v3);
    a0 += g * v0;
    a1 += g * v1;
    a2 += g * v2;
    a3 += g * v3;
  }
  for (int l = 0; i + l < n; ++l) {  // the tail, to the same partial sums a full step would use
    const acc_t g = static_cast<acc_t>(grad[i + l]);
    a0[l] += g * static_cast<acc_t>(x[i + l]);
    a1[l] += g * static_cast<acc_t>(x1[i + l]);
    a2[l] += g * static_cast<acc_t>(x2[i + l]);
    a3[l] += g * static_cast<acc_t>(x3[i + l]);
  }
  for (int l = 0; l < kLanes; ++l) {
    dots[0] += a0[l];
    dots[1] += a1[l];
    dots[2] += a2[l];
    dots[3] += a3[l];
  }
}

// Part of a column row to fill: kernel points [k0, k1) of the channels [c_lo, c_hi) (within one conv
// group), written at (position in the full row) - base, rows ld elements apart.
struct FillChunk {
  int64_t k0, k1, c_lo, c_hi, base, ld;
};

// The sampling plan of a tile, entry row * cols + q for column q and plan row (deform group, kernel
// point), as separate arrays: a plan row's entries are consecutive, as the offsets they come from.
template <typename acc_t>
struct Plan {
  int64_t cols = 0;
  std::vector<int32_t> base;            // padded position (in pixels) of the (low y, low x) corner; 0 = outside
  std::array<std::vector<acc_t>, 4> w;  // bilinear weights, times the mask where the plan folds it in
  std::vector<acc_t> mask;              // the mask, where it is kept apart

  void resize(int64_t rows, int64_t cols_, bool with_mask) {
    cols = cols_;
    base.resize(rows * cols);
    for (auto& wj : w) wj.resize(rows * cols);
    if (with_mask) mask.resize(rows * cols);
  }
  DCN_INLINE int64_t entry(int64_t q, int64_t row) const { return row * cols + q; }
  DCN_INLINE void weights(int64_t i, acc_t out[4]) const {
    for (int j = 0; j < 4; ++j) out[j] = w[j][i];
  }
  // The weights of a modulated sample: the mask applied here where the plan keeps it apart.
  DCN_INLINE void modulated_weights(int64_t i, acc_t out[4]) const {
    weights(i, out);
    if (!mask.empty()) {
      for (int j = 0; j < 4; ++j) out[j] *= mask[i];
    }
  }
};

template <typename scalar_t>
class CpuColumns final : public ColumnKernels {
  using acc_t = at::opmath_type<scalar_t>;

 public:
  // fold_mask: the forward needs only modulated samples, so the mask goes into the plan's weights;
  // the backward keeps it apart (the mask gradient needs the unmodulated samples).
  CpuColumns(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
             bool fold_mask)
      : g_(g),
        pad_width_(g.width + 2),
        pad_plane_((g.height + 3) * (g.width + 2)),
        offset_(offset.const_data_ptr<scalar_t>()),
        mask_(mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr),
        fold_mask_(fold_mask),
        base_y_(g.pixels()),
        base_x_(g.pixels()) {
    for (int64_t p = 0; p < g.pixels(); ++p) {  // conv_base_y/x of kernel point (0, 0)
      base_y_[p] = static_cast<int32_t>(p / g.out_w * g.sampling.stride_h - g.sampling.pad_h);
      base_x_[p] = static_cast<int32_t>(p % g.out_w * g.sampling.stride_w - g.sampling.pad_w);
    }
    TORCH_CHECK_VALUE(pad_plane_ < (int64_t(1) << 31), "input planes of more than 2^31 elements (", g.height, " x ",
                      g.width, ") are not supported on CPU");
    // Only the border is zeroed; the transpose below writes the interior (zeroing it too was a pass
    // over the whole buffer for nothing).
    padded_ = at::empty({g.batch, g.height + 3, g.width + 2, g.in_channels}, input.options());
    padded_.narrow(1, 0, kPadTop).zero_();
    padded_.narrow(1, kPadTop + g.height, 3 - kPadTop).zero_();
    at::Tensor rows = padded_.narrow(1, kPadTop, g.height);
    rows.narrow(2, 0, kPadLeft).zero_();
    rows.narrow(2, kPadLeft + g.width, 2 - kPadLeft).zero_();
    // padded[n, y + kPadTop, x + kPadLeft, c] = input[n, c, y, x], one (C, W) transpose per image row.
    const int64_t c = g.in_channels, plane = g.plane();
    transpose_batched<false>(input.const_data_ptr<scalar_t>(), plane,
                             padded_.data_ptr<scalar_t>() + (kPadTop * pad_width_ + kPadLeft) * c, c, c, g.width,
                             {g.batch, c * plane, pad_plane_ * c}, {g.height, g.width, pad_width_ * c});
  }

  ColumnLayout layout() const override { return ColumnLayout::kPixelMajor; }

  int64_t preferred_tile_bytes() const override {
    return std::max(kTileBytes, kMinTileColumns * g_.in_channels * g_.taps() * int64_t(sizeof(scalar_t)));
  }

  void begin_tile(const ColumnTile& tile) override {
    tile_ = tile;
    build_plan();
  }

  void finish_backward(ConvGrads& grads) override {
    if (!padded_grad_.defined()) return;
    // grads.input[n, lo + c, y, x] += padded_grad[n, blk, y + kPadTop, x + kPadLeft, c] for each block
    // of channels [lo, hi): (W, hi - lo) transposes.
    const int64_t channels = g_.in_channels, plane = g_.plane(), block = grad_block_;
    const int64_t blocks = (channels + block - 1) / block, block_plane = pad_plane_ * block;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t lo = blk * block, hi = std::min(channels, lo + block);
      transpose_batched<true>(
          padded_grad_.const_data_ptr<acc_t>() + blk * block_plane + (kPadTop * pad_width_ + kPadLeft) * block, block,
          grads.input.data_ptr<acc_t>() + lo * plane, plane, g_.width, hi - lo,
          {g_.batch, blocks * block_plane, channels * plane}, {g_.height, pad_width_ * block, g_.width});
    }
  }

  // columns[q * C_in * taps + position of (channel, kernel point)] = modulated sample (kPixelMajor).
  void fill_columns(const at::Tensor& columns) override {
    scalar_t* out = columns.data_ptr<scalar_t>();
    const CpuIsa isa = loop_isa(kFillIsa<scalar_t>);
    const FillChunk whole{0, g_.taps(), 0, g_.in_channels, 0, g_.in_channels * g_.taps()};
    at::parallel_for(0, tile_.cols(), grain_for(g_.in_channels * g_.taps()), [&](int64_t q0, int64_t q1) {
      DCN_ISA_CALL(isa, fill_range, (tile_, plan_, whole, out, q0, q1));
    });
  }

  // The fused forward (cpu_fused_forward): per block of output pixels, the sampling plan, then per
  // conv group and chunk of kernel points the block's columns -- small enough to stay in the core's
  // cache -- and their product with the weight by oneDNN's batch-reduce GEMM microkernel
  // (at::native::cpublas::brgemm), accumulated over the chunks in a float block of the output that is
  // transposed into place at the end. The tiled path writes a 4 MiB column tile out to the shared
  // cache and MKL copies it back into its own panels; here the columns are read once, from the
  // core's cache, where they were written (measured at c3, one thread: the copy alone was ~12% of
  // the op). Every output element is computed by one task with the same kernel shapes whatever the
  // thread count and block size, so results are bitwise identical at any thread count.
  at::Tensor forward_fused(const at::Tensor& weight, const std::optional<at::Tensor>& bias) const {
    static_assert(std::is_same_v<scalar_t, float>, "the fused forward is float32 only");
    const int64_t taps = g_.taps(), cpg = g_.in_per_group(), out_pg = g_.out_per_group();
    const int64_t k_group = taps * cpg, n_out = g_.out_channels, pixels = g_.pixels();
    at::Tensor output = at::empty({g_.batch, n_out, g_.out_h, g_.out_w}, weight.options());
    // B of group grp: (taps * cpg, C_out / groups) row-major, rows in the columns' (k, c) order:
    // B[grp][k * cpg + c][o] = weight[grp * out_pg + o][c][k], one reordering transpose.
    at::Tensor b = at::empty({g_.groups, k_group, out_pg}, weight.options());
    transpose_batched<false>(weight.const_data_ptr<float>(), k_group, b.data_ptr<float>(), out_pg, out_pg, k_group,
                             {g_.groups, out_pg * k_group, k_group * out_pg}, {1, 0, 0}, taps);
    const float* b_data = b.const_data_ptr<float>();
    const float* bias_data = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
    const int64_t block = fused_block_pixels();
    const int64_t blocks = (pixels + block - 1) / block;
    const std::vector<FusedChunk> chunks = fused_chunks();
    int64_t widest = 0;
    for (const FusedChunk& ch : chunks) widest = std::max(widest, ch.width());
    const CpuIsa isa = loop_isa(kFillIsa<scalar_t>);
    float* out_data = output.data_ptr<float>();

    at::parallel_for(0, g_.batch * blocks, 1, [&](int64_t t0, int64_t t1) {
      Plan<acc_t> plan;
      // Rows past a block's last pixel keep an earlier block's values (or zeros): their output rows
      // are computed and dropped (a GEMM row depends on its own row of A only).
      std::vector<float> a(block * widest), c(block * n_out);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / blocks, p0 = (t % blocks) * block, p1 = std::min(pixels, p0 + block);
        const ColumnTile tile{n, 1, p0, p1};
        const int64_t rows_m = (tile.cols() + kFusedRows - 1) / kFusedRows * kFusedRows;
        plan.resize(plan_rows(), tile.cols(), /*with_mask=*/false);
        plan_range(tile, plan, 0, tile.cols());
        for (int64_t grp = 0; grp < g_.groups; ++grp) {
          for (size_t i = 0; i < chunks.size(); ++i) {
            const FusedChunk& ch = chunks[i];
            const int64_t width = ch.width(), first_row = ch.k0 * cpg + ch.c0;  // of B, within the group
            const FillChunk chunk{ch.k0, ch.k1, grp * cpg + ch.c0, grp * cpg + ch.c1, grp * k_group + first_row, width};
            DCN_ISA_CALL(isa, fill_range, (tile, plan, chunk, a.data(), 0, tile.cols()));
            const float* b_chunk = b_data + (grp * k_group + first_row) * out_pg;
            for (int64_t o0 = 0; o0 < out_pg; o0 += kFusedOutColumns) {
              const int64_t o1 = std::min(out_pg, o0 + kFusedOutColumns);
              for (int64_t m0 = 0; m0 < rows_m; m0 += kFusedRows) {
                at::native::cpublas::brgemm(kFusedRows, o1 - o0, width, width, out_pg, n_out, /*add_C=*/i > 0,
                                            a.data() + m0 * width, b_chunk + o0,
                                            c.data() + m0 * n_out + grp * out_pg + o0, /*is_vnni=*/false);
              }
            }
          }
        }
        // output[n, o, p0 + i] = c[i, o] + bias[o]
        transpose_f32(c.data(), n_out, tile.cols(), n_out, out_data + n * n_out * pixels + p0, pixels, false,
                      bias_data);
      }
    });
    return output;
  }

  void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) override {
    TORCH_INTERNAL_ASSERT(!fold_mask_, "backprop_columns needs a plan with the mask kept apart");
    const scalar_t* gc = grad_columns.const_data_ptr<scalar_t>();
    if (grads.input.defined()) {
      if (!padded_grad_.defined()) {
        // One block of channels per scatter task, each block a plane of its own: the threads write
        // disjoint stretches of memory (interleaved channel ranges of one channels-last buffer
        // tripled the scatter's CPU time on two threads -- lines bouncing between the cores, by all
        // appearances through the prefetchers). Fixed for the call, from its first tile.
        grad_block_ = scatter_block();
        const int64_t blocks = (g_.in_channels + grad_block_ - 1) / grad_block_;
        padded_grad_ = at::zeros({g_.batch, blocks, g_.height + 3, g_.width + 2, grad_block_}, grads.input.options());
      }
      scatter_grad_input(gc, padded_grad_.data_ptr<acc_t>());
    }
    if (grads.offset.defined()) {
      reduce_grad_offset_mask(gc, grads.offset.data_ptr<acc_t>(),
                              grads.mask.defined() ? grads.mask.data_ptr<acc_t>() : nullptr);
    }
  }

 private:
  DCN_INLINE int64_t plan_rows() const { return g_.deform_groups * g_.taps(); }
  DCN_INLINE int64_t down() const { return pad_width_ * g_.in_channels; }  // elements between padded rows
  // The padded channels-last image that column q of the tile samples.
  template <typename T>
  DCN_INLINE T* image(T* padded, const ColumnTile& tile, int64_t q) const {
    return padded + (tile.n0 + q / tile.width()) * pad_plane_ * g_.in_channels;
  }
  template <typename T>
  DCN_INLINE T* image(T* padded, int64_t q) const {
    return image(padded, tile_, q);
  }

  // A conv group's column row in chunks of about kFusedChunkColumns values (at most that many where
  // the row holds more): whole kernel points where a group has at most kFusedChunkColumns channels,
  // in equal numbers; else each kernel point's channels in equal pieces. At most two widths per
  // layer, fixed by its channels.
  struct FusedChunk {
    int64_t k0, k1, c0, c1;  // kernel points [k0, k1), the group's channels [c0, c1)
    int64_t width() const { return (k1 - k0) * (c1 - c0); }
  };
  std::vector<FusedChunk> fused_chunks() const {
    const int64_t taps = g_.taps(), cpg = g_.in_per_group();
    std::vector<FusedChunk> chunks;
    if (cpg <= kFusedChunkColumns) {
      const int64_t count = (taps + kFusedChunkColumns / cpg - 1) / (kFusedChunkColumns / cpg);
      const int64_t per = (taps + count - 1) / count;
      for (int64_t k0 = 0; k0 < taps; k0 += per) chunks.push_back({k0, std::min(taps, k0 + per), 0, cpg});
    } else {
      const int64_t count = (cpg + kFusedChunkColumns - 1) / kFusedChunkColumns, per = (cpg + count - 1) / count;
      for (int64_t k = 0; k < taps; ++k) {
        for (int64_t c0 = 0; c0 < cpg; c0 += per) chunks.push_back({k, k + 1, c0, std::min(cpg, c0 + per)});
      }
    }
    return chunks;
  }

  // Output pixels per task of the fused forward: kFusedBlockPixels, or fewer (whole kFusedRows) where
  // that would leave a thread with fewer than two tasks. (The block size changes no result.)
  int64_t fused_block_pixels() const {
    const int64_t tasks_wanted = 2 * at::get_num_threads();
    const int64_t per_task = (g_.batch * g_.pixels() + tasks_wanted - 1) / tasks_wanted;
    const int64_t rounded = (per_task + kFusedRows - 1) / kFusedRows * kFusedRows;
    return std::max(kFusedRows, std::min(kFusedBlockPixels, rounded));
  }

  // Calls fn(c0, c1, position) for the channels [c0, c1) of the row's deform group within [lo, hi)
  // that are consecutive in a column: split where a conv group ends. `position` is c0's place in
  // the column row (ColumnLayout::kPixelMajor).
  template <typename Fn>
  DCN_INLINE void for_each_channel_run(int64_t row, int64_t lo, int64_t hi, const Fn& fn) const {
    const int64_t taps = g_.taps(), k = row % taps, cpdg = g_.in_per_deform_group(), cpg = g_.in_per_group();
    const int64_t first = std::max(lo, (row / taps) * cpdg), last = std::min(hi, (row / taps + 1) * cpdg);
    for (int64_t c0 = first; c0 < last;) {
      const int64_t grp = c0 / cpg, c1 = std::min(last, (grp + 1) * cpg);
      fn(c0, c1, grp * taps * cpg + k * cpg + (c0 - grp * cpg));
      c0 = c1;
    }
  }

  // Columns [q0, q1) of the tile, restricted to a chunk (see FillChunk).
  DCN_INLINE void fill_range_body(const ColumnTile& tile, const Plan<acc_t>& plan, const FillChunk& chunk,
                                  scalar_t* out, int64_t q0, int64_t q1) const {
    const int64_t taps = g_.taps(), cpdg = g_.in_per_deform_group();
    for (int64_t q = q0; q < q1; ++q) {
      const scalar_t* x = image(padded_.const_data_ptr<scalar_t>(), tile, q);
      for (int64_t dg = 0; dg < g_.deform_groups; ++dg) {
        if ((dg + 1) * cpdg <= chunk.c_lo || dg * cpdg >= chunk.c_hi) continue;
        for (int64_t k = chunk.k0; k < chunk.k1; ++k) {
          const int64_t row = dg * taps + k, e = plan.entry(q, row);
          acc_t w[4];
          plan.modulated_weights(e, w);
          const scalar_t* corner = x + int64_t(plan.base[e]) * g_.in_channels;
          for_each_channel_run(row, chunk.c_lo, chunk.c_hi,
                               [&](int64_t c0, int64_t c1, int64_t position) DCN_LAMBDA_INLINE {
                                 sample_channels<scalar_t, acc_t>(corner + c0, c1 - c0, g_.in_channels, down(), w,
                                                                  out + q * chunk.ld + position - chunk.base);
                               });
        }
      }
    }
  }
  DCN_ISA_VARIANTS(fill_range,
                   (const ColumnTile& tile, const Plan<acc_t>& plan, const FillChunk& chunk, scalar_t* out, int64_t q0,
                    int64_t q1) const,
                   (tile, plan, chunk, out, q0, q1))

  void build_plan() {
    plan_.resize(plan_rows(), tile_.cols(), !fold_mask_);
    at::parallel_for(0, tile_.cols(), grain_for(plan_rows()),
                     [&](int64_t q0, int64_t q1) { plan_range(tile_, plan_, q0, q1); });
  }

  // The plan entries of the tile's columns [q0, q1): per image and plan row, a run of consecutive
  // output pixels.
  void plan_range(const ColumnTile& tile, Plan<acc_t>& plan, int64_t q0, int64_t q1) const {
    const int64_t width = tile.width();
    const CpuIsa isa = loop_isa(kPlanIsa);
    for (int64_t q = q0; q < q1;) {
      const int64_t b = q / width, end = std::min(q1, (b + 1) * width);
      for (int64_t row = 0; row < plan_rows(); ++row) {
        DCN_ISA_CALL(isa, plan_run, (plan, tile.n0 + b, row, tile.p0 + q % width, end - q, plan.entry(q, row)));
      }
      q = end;
    }
  }

  // Plan row `row` of image n for the `len` output pixels from p, into entries [e, e + len): the
  // arithmetic of zero_border_padded written without branches (an out-of-range sample selects base 0
  // and zero weights; floor() sees 0 in its place, so no NaN or infinity reaches the conversion), so
  // that the compiler vectorises it over the pixels. The same operations in the same order: the
  // same plan bit for bit.
  DCN_INLINE void plan_run_body(Plan<acc_t>& plan, int64_t n, int64_t row, int64_t p, int64_t len, int64_t e) const {
    const int64_t rows = plan_rows(), pixels = g_.pixels(), k = row % g_.taps();
    const int32_t dy = static_cast<int32_t>(k / g_.kernel_w * g_.sampling.dil_h);
    const int32_t dx = static_cast<int32_t>(k % g_.kernel_w * g_.sampling.dil_w);
    const scalar_t* __restrict__ off_y = offset_ + (n * 2 * rows + 2 * row) * pixels + p;
    const scalar_t* __restrict__ off_x = off_y + pixels;
    const scalar_t* __restrict__ mask = mask_ ? mask_ + (n * rows + row) * pixels + p : nullptr;
    const int32_t* __restrict__ y0 = base_y_.data() + p;
    const int32_t* __restrict__ x0 = base_x_.data() + p;
    int32_t* __restrict__ base = plan.base.data() + e;
    acc_t* __restrict__ w0 = plan.w[0].data() + e;
    acc_t* __restrict__ w1 = plan.w[1].data() + e;
    acc_t* __restrict__ w2 = plan.w[2].data() + e;
    acc_t* __restrict__ w3 = plan.w[3].data() + e;
    acc_t* __restrict__ kept = fold_mask_ ? nullptr : plan.mask.data() + e;
    const acc_t height = static_cast<acc_t>(g_.height), width = static_cast<acc_t>(g_.width);
    const int32_t pad_width = static_cast<int32_t>(pad_width_);
    for (int64_t i = 0; i < len; ++i) {
      const acc_t y = static_cast<acc_t>(y0[i] + dy) + static_cast<acc_t>(off_y[i]);
      const acc_t x = static_cast<acc_t>(x0[i] + dx) + static_cast<acc_t>(off_x[i]);
      const bool in = y > acc_t(-1) && x > acc_t(-1) && y < height && x < width;  // zero_border_in_range
      const acc_t fy = dcn_floor(in ? y : acc_t(0)), fx = dcn_floor(in ? x : acc_t(0));
      const acc_t ly = y - fy, lx = x - fx, hy = acc_t(1) - ly, hx = acc_t(1) - lx;  // bilinear_weights
      const acc_t m = mask ? static_cast<acc_t>(mask[i]) : acc_t(1);
      // Weights times the mask where it is folded in -- also outside the map, where the weight is 0
      // and 0 * m keeps a non-finite mask's NaN, as mmcv, torchvision and the CUDA kernel do.
      // (x * 1 is x exactly.)
      const acc_t scale = fold_mask_ ? m : acc_t(1);
      base[i] = in ? (static_cast<int32_t>(fy) + kPadTop) * pad_width + static_cast<int32_t>(fx) + kPadLeft : 0;
      w0[i] = (in ? hy * hx : acc_t(0)) * scale;
      w1[i] = (in ? hy * lx : acc_t(0)) * scale;
      w2[i] = (in ? ly * hx : acc_t(0)) * scale;
      w3[i] = (in ? ly * lx : acc_t(0)) * scale;
      if (kept) kept[i] = m;
    }
  }
  DCN_ISA_VARIANTS(plan_run, (Plan<acc_t> & plan, int64_t n, int64_t row, int64_t p, int64_t len, int64_t e) const,
                   (plan, n, row, p, len, e))

  // Each task owns one block of channels of one image's padded gradient: no two threads write alike,
  // and every element receives its contributions in the same order whatever the thread count.
  void scatter_grad_input(const scalar_t* grad_columns, acc_t* padded_grad) {
    const int64_t block = grad_block_, blocks = (g_.in_channels + block - 1) / block;
    const CpuIsa isa = loop_isa(kScatterIsa);
    at::parallel_for(
        0, tile_.count * blocks, grain_for(tile_.width() * plan_rows() * block),
        [&](int64_t t0, int64_t t1) { DCN_ISA_CALL(isa, scatter_range, (grad_columns, padded_grad, block, t0, t1)); });
  }

  // Channels per scatter task: the images' channels split over the threads, so that each thread
  // reads the tile's column gradient in one pass (narrow blocks re-read it once per block, in short
  // strided pieces). The split changes no result: an element receives its contributions in
  // (column, kernel point) order whatever the blocks.
  int64_t scatter_block() const {
    const int64_t threads_per_image = std::max<int64_t>(1, (at::get_num_threads() + tile_.count - 1) / tile_.count);
    const int64_t per_thread = (g_.in_channels + threads_per_image - 1) / threads_per_image;
    return std::max(kMinChannelBlock, (per_thread + kMinChannelBlock - 1) / kMinChannelBlock * kMinChannelBlock);
  }

  DCN_INLINE void scatter_range_body(const scalar_t* grad_columns, acc_t* padded_grad, int64_t block, int64_t t0,
                                     int64_t t1) const {
    const int64_t rows = plan_rows(), row_len = g_.in_channels * g_.taps(), width = tile_.width();
    const int64_t blocks = (g_.in_channels + block - 1) / block;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / blocks, lo = (task % blocks) * block;
      const int64_t hi = std::min(g_.in_channels, lo + block);
      // This block's plane of the image's padded gradient: (H + 3, W + 2, block).
      acc_t* gx = padded_grad + ((tile_.n0 + b) * blocks + task % blocks) * pad_plane_ * block;
      for (int64_t q = b * width; q < (b + 1) * width; ++q) {
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t e = plan_.entry(q, row);
          if (plan_.base[e] == 0) continue;  // outside the map: all four corners are padding
          acc_t w[4];
          plan_.modulated_weights(e, w);
          acc_t* corner = gx + int64_t(plan_.base[e]) * block;
          for_each_channel_run(row, lo, hi, [&](int64_t c0, int64_t c1, int64_t position) DCN_LAMBDA_INLINE {
            scatter_channels<scalar_t, acc_t>(grad_columns + q * row_len + position, c1 - c0, block, pad_width_ * block,
                                              w, corner + (c0 - lo));
          });
        }
      }
    }
  }
  DCN_ISA_VARIANTS(scatter_range,
                   (const scalar_t* grad_columns, acc_t* padded_grad, int64_t block, int64_t t0, int64_t t1) const,
                   (grad_columns, padded_grad, block, t0, t1))

  void reduce_grad_offset_mask(const scalar_t* grad_columns, acc_t* grad_offset, acc_t* grad_mask) {
    const CpuIsa isa = loop_isa(kDotsIsa);
    at::parallel_for(0, tile_.cols(), grain_for(g_.in_channels * g_.taps()), [&](int64_t q0, int64_t q1) {
      DCN_ISA_CALL(isa, reduce_range, (grad_columns, grad_offset, grad_mask, q0, q1));
    });
  }

  DCN_INLINE void reduce_range_body(const scalar_t* grad_columns, acc_t* grad_offset, acc_t* grad_mask, int64_t q0,
                                    int64_t q1) const {
    const int64_t rows = plan_rows(), row_len = g_.in_channels * g_.taps(), pixels = g_.pixels();
    const int64_t width = tile_.width();
    {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = tile_.n0 + q / width, p = tile_.p0 + q % width;
        const scalar_t* x = image(padded_.const_data_ptr<scalar_t>(), q);
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t e = plan_.entry(q, row);
          // dots[j]: the column gradient against corner j's values, over the group's channels.
          // Outside the map (base 0) they stay 0: no gradient, not even NaN * 0.
          acc_t dots[4] = {}, w[4];
          plan_.weights(e, w);
          if (plan_.base[e] != 0) {
            const scalar_t* corner = x + int64_t(plan_.base[e]) * g_.in_channels;
            for_each_channel_run(row, 0, g_.in_channels,
                                 [&](int64_t c0, int64_t c1, int64_t position) DCN_LAMBDA_INLINE {
                                   corner_dots<scalar_t, acc_t>(grad_columns + q * row_len + position, corner + c0,
                                                                c1 - c0, g_.in_channels, down(), dots);
                                 });
          }
          // The sample is linear in the corner values, so its coordinate gradient summed over
          // channels is bilinear_coord_grad of the dots; the unmodulated weights give back the
          // fractional position: ly = w2 + w3, lx = w1 + w3.
          acc_t dy, dx;
          bilinear_coord_grad(dots, w[2] + w[3], w[1] + w[3], dy, dx);
          const acc_t m = plan_.mask[e];
          acc_t* go = grad_offset + (n * 2 * rows + 2 * row) * pixels + p;
          go[0] = dy * m;
          go[pixels] = dx * m;
          if (grad_mask) {
            grad_mask[(n * rows + row) * pixels + p] =
                w[0] * dots[0] + w[1] * dots[1] + w[2] * dots[2] + w[3] * dots[3];
          }
        }
      }
    }
  }
  DCN_ISA_VARIANTS(reduce_range,
                   (const scalar_t* grad_columns, acc_t* grad_offset, acc_t* grad_mask, int64_t q0, int64_t q1) const,
                   (grad_columns, grad_offset, grad_mask, q0, q1))

  const ConvGeometry& g_;
  const int64_t pad_width_, pad_plane_;  // padded row length and plane size, in pixels
  const scalar_t* offset_;
  const scalar_t* mask_;
  const bool fold_mask_;
  std::vector<int32_t> base_y_, base_x_;  // per output pixel: y and x of its kernel point (0, 0)
  ColumnTile tile_{};
  at::Tensor padded_;       // channels last: (N, H + 3, W + 2, C)
  at::Tensor padded_grad_;  // in blocks of channels: (N, C / grad_block_, H + 3, W + 2, grad_block_)
  int64_t grad_block_ = 0;
  Plan<acc_t> plan_;
};

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  at::Tensor output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(), "modulated_deform_conv2d_cpu", [&] {
    CpuColumns<scalar_t> kernels(op.g, op.input, op.offset, op.mask, /*fold_mask=*/true);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu_fused_forward(op.input.scalar_type()) && op.g.batch > 0 && op.g.out_channels > 0 &&
          op.g.in_channels > 0) {
        output = kernels.forward_fused(op.weight, op.bias);
        return;
      }
    }
    output = deform_conv_forward(op, kernels);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups,
    std::array<bool, 3> output_mask) {
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad_output(grad_output, op.input, op.g);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, op.input.scalar_type(), "modulated_deform_conv2d_backward_cpu", [&] {
        CpuColumns<scalar_t> kernels(op.g, op.input, op.offset, op.mask, /*fold_mask=*/false);
        grads = deform_conv_backward(op, grad_output.contiguous(), output_mask, kernels);
      });
  return grads;
}

// "fill=avx512 plan=avx2 scatter=avx512 dots=avx2 cpu=avx512": the ISA each sampling loop runs
// now (see loop_isa), and the widest the CPU supports.
std::string cpu_isa_op() {
  return std::string("fill=") + cpu_isa_name(loop_isa(kFillIsa<float>)) + " plan=" + cpu_isa_name(loop_isa(kPlanIsa)) +
         " scatter=" + cpu_isa_name(loop_isa(kScatterIsa)) + " dots=" + cpu_isa_name(loop_isa(kDotsIsa)) +
         " cpu=" + cpu_isa_name(cpu_isa_supported());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdet_dcnv2, m) { m.def("_cpu_isa() -> str", &cpu_isa_op); }

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CPU, m) {
  m.impl("modulated_deform_conv2d", &forward_cpu);
  m.impl("modulated_deform_conv2d_backward", &backward_cpu);
}

}  // namespace mmdet_dcnv2
