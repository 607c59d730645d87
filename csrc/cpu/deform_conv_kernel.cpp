// Modulated deformable convolution on the CPU, under the chunked GEMM driver of deform_conv.cpp.
//
// Per chunk of images, a sampling plan is built once per (deform group, kernel point, output pixel):
// the offset of the sample's top-left corner in a zero-padded copy of the input and its four
// bilinear weights (zero_border_padded in dcn_common.h). Every channel of the group reuses that
// plan -- the incumbents recompute the weights per channel -- and, thanks to the padding, each
// sample is four unconditional loads and four multiply-adds.
//
// Backward: grad_input is a scatter through the same plan into a padded gradient buffer, parallel
// over channel planes so that each thread owns the planes it writes; grad_offset / grad_mask reduce
// over a group's channels in a fixed order. No atomics: results are bitwise identical run to run,
// whatever the thread count (ATen's GEMMs aside, which may round differently at other thread counts).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../deform_conv.h"

namespace mmdet_dcnv2 {
namespace {

// Pixels per parallel task: a block of the plan stays in L1 while every channel of the group uses it.
constexpr int64_t kPixelBlock = 256;
// Columns per tile: the GEMM then reads the columns from cache, and the buffer is small enough that
// reusing it costs no page faults (measured: a fresh 70 MB buffer per call costs ~10% of a c3 forward).
constexpr int64_t kTileBytes = int64_t(4) << 20;
// ... but never fewer columns than keep the GEMM efficient (wide layers such as c5 need the larger tile).
constexpr int64_t kMinTileColumns = 512;
// Samples a thread should have at least before another one is woken: waking threads for a tiny
// layer costs more than the work (seen: a 10x slower gradcheck on a busy machine).
constexpr int64_t kMinSamplesPerThread = int64_t(1) << 14;

// Grain size for at::parallel_for over tasks of `samples_per_task` samples each.
inline int64_t grain_for(int64_t samples_per_task) {
  return std::max<int64_t>(1, kMinSamplesPerThread / std::max<int64_t>(1, samples_per_task));
}

// The sampling plan of a tile, one entry per (plan row, column), as separate arrays (contiguous
// loads per field in the inner loops).
template <typename acc_t>
struct Plan {
  std::vector<int32_t> base;           // offset of the (low y, low x) corner in a padded plane
  std::array<std::vector<acc_t>, 4> w;  // bilinear weights, times the mask where the plan folds it in

  void resize(int64_t n) {
    base.resize(n);
    for (auto& wj : w) wj.resize(n);
  }
  // The arrays from entry i on.
  struct View {
    const int32_t* base;
    const acc_t* w[4];
  };
  View at(int64_t i) const { return {base.data() + i, {w[0].data() + i, w[1].data() + i, w[2].data() + i, w[3].data() + i}}; }
};

// The input's planes, padded with zeros as zero_border_padded expects.
struct PaddedPlanes {
  int64_t width, plane;  // padded row length and plane size

  explicit PaddedPlanes(const ConvGeometry& g)
      : width(g.width + 2), plane((g.height + 3) * (g.width + 2)) {}

  static at::Tensor pad(const at::Tensor& images) {
    return at::constant_pad_nd(images, {kPadLeft, 1, kPadTop, 1}, 0).contiguous();
  }
  static at::Tensor interior(const at::Tensor& padded, const ConvGeometry& g) {
    return padded.narrow(2, kPadTop, g.height).narrow(3, kPadLeft, g.width);
  }
};

// One run of columns [qa, qb) of a plan row for `channels` consecutive channels:
// col[c * col_stride + q] = m[q] * sum_j w_j[q] * x_c[base[q] + corner_j], x_c = x + c * plane.
// `m` is null where the mask is folded into the weights.
template <typename scalar_t, typename acc_t>
void fill_run(const scalar_t* x, int64_t plane, int64_t channels, typename Plan<acc_t>::View p, const acc_t* m,
              int64_t qa, int64_t qb, int64_t row_len, scalar_t* col, int64_t col_stride) {
  for (int64_t c = 0; c < channels; ++c, x += plane, col += col_stride) {
    for (int64_t q = qa; q < qb; ++q) {
      const scalar_t* corner = x + p.base[q];
      acc_t v = p.w[0][q] * static_cast<acc_t>(corner[0]) + p.w[1][q] * static_cast<acc_t>(corner[1]) +
                p.w[2][q] * static_cast<acc_t>(corner[row_len]) + p.w[3][q] * static_cast<acc_t>(corner[row_len + 1]);
      if (m) v *= m[q];
      col[q] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
class CpuColumns final : public ColumnKernels {
  using acc_t = at::opmath_type<scalar_t>;

 public:
  // fold_mask: the forward needs only modulated samples, so the mask goes into the plan's weights;
  // the backward keeps it apart (the mask gradient needs the unmodulated samples).
  CpuColumns(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
             bool fold_mask)
      : g_(g),
        pad_(g),
        offset_(offset.const_data_ptr<scalar_t>()),
        mask_(mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr),
        fold_mask_(fold_mask) {
    TORCH_CHECK_VALUE(pad_.plane < (int64_t(1) << 31), "input planes of more than 2^31 elements (", g.height,
                      " x ", g.width, ") are not supported on CPU");
    padded_ = PaddedPlanes::pad(input);
  }

  int64_t preferred_tile_bytes() const override {
    return std::max(kTileBytes, kMinTileColumns * g_.in_channels * g_.taps() * int64_t(sizeof(scalar_t)));
  }

  void begin_tile(const ColumnTile& tile) override {
    tile_ = tile;
    build_plan();
  }

  void finish_backward(ConvGrads& grads) override {
    if (padded_grad_.defined()) grads.input.add_(PaddedPlanes::interior(padded_grad_, g_));
  }

  // columns[(c * taps + k) * cols + b * width + (p - p0)] = modulated sample of channel c, image n0 + b.
  void fill_columns(const at::Tensor& columns) override {
    const int64_t taps = g_.taps(), width = tile_.width(), cols = tile_.cols(), cpg = g_.in_per_deform_group();
    scalar_t* out = columns.data_ptr<scalar_t>();
    const scalar_t* padded = padded_.const_data_ptr<scalar_t>();
    for_each_block([&](int64_t row, int64_t q0, int64_t q1) {
      const int64_t grp = row / taps, k = row % taps, c0 = grp * cpg;
      const acc_t* m = fold_mask_ ? nullptr : masks_.data() + row * cols;
      for (int64_t qa = q0; qa < q1;) {  // one image's run of columns at a time
        const int64_t b = qa / width, qb = std::min(q1, (b + 1) * width);
        fill_run<scalar_t, acc_t>(padded + ((tile_.n0 + b) * g_.in_channels + c0) * pad_.plane, pad_.plane, cpg,
                                  plan_.at(row * cols), m, qa, qb, pad_.width, out + (c0 * taps + k) * cols,
                                  taps * cols);
        qa = qb;
      }
    });
  }

  void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) override {
    TORCH_INTERNAL_ASSERT(!fold_mask_, "backprop_columns needs a plan with the mask kept apart");
    const scalar_t* gc = grad_columns.const_data_ptr<scalar_t>();
    if (grads.input.defined()) {
      if (!padded_grad_.defined()) padded_grad_ = at::zeros(padded_.sizes(), grads.input.options());
      scatter_grad_input(gc, padded_grad_.data_ptr<acc_t>());
    }
    if (grads.offset.defined()) {
      reduce_grad_offset_mask(gc, grads.offset.data_ptr<acc_t>(),
                              grads.mask.defined() ? grads.mask.data_ptr<acc_t>() : nullptr);
    }
  }

 private:
  // plan_[(grp * taps + k) * cols + b * width + (p - p0)] for the current tile; masks_ alike.
  void build_plan() {
    const int64_t taps = g_.taps(), pixels = g_.pixels(), width = tile_.width(), cols = tile_.cols();
    const int64_t rows = g_.deform_groups * taps;
    plan_.resize(rows * cols);
    if (!fold_mask_) masks_.resize(rows * cols);
    at::parallel_for(0, rows * tile_.count, grain_for(width), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / tile_.count, b = task % tile_.count, n = tile_.n0 + b;
        const int64_t k = row % taps, ki = k / g_.kernel_w, kj = k % g_.kernel_w;
        const scalar_t* off = offset_ + (n * 2 * rows + 2 * row) * pixels;
        const scalar_t* msk = mask_ ? mask_ + (n * rows + row) * pixels : nullptr;
        const int64_t first = row * cols + b * width;
        acc_t* out_mask = fold_mask_ ? nullptr : masks_.data() + first;
        for (int64_t l = 0; l < width; ++l) {
          const int64_t p = tile_.p0 + l;
          const acc_t y = conv_base_y<acc_t>(g_.sampling, p / g_.out_w, ki) + static_cast<acc_t>(off[p]);
          const acc_t x = conv_base_x<acc_t>(g_.sampling, p % g_.out_w, kj) + static_cast<acc_t>(off[pixels + p]);
          acc_t w[4];
          plan_.base[first + l] = zero_border_padded<acc_t, int32_t>(y, x, static_cast<int32_t>(g_.height),
                                                                     static_cast<int32_t>(g_.width), w);
          const acc_t m = msk ? static_cast<acc_t>(msk[p]) : acc_t(1);
          if (out_mask) out_mask[l] = m;
          const acc_t scale = out_mask ? acc_t(1) : m;
          for (int j = 0; j < 4; ++j) plan_.w[j][first + l] = w[j] * scale;
        }
      }
    });
  }

  // Runs fn(row, q0, q1) in parallel over (plan row, block of the tile's columns).
  template <typename Fn>
  void for_each_block(const Fn& fn) const {
    const int64_t rows = g_.deform_groups * g_.taps(), cols = tile_.cols();
    const int64_t blocks = (cols + kPixelBlock - 1) / kPixelBlock;
    const int64_t samples_per_task = std::min(cols, kPixelBlock) * g_.in_per_deform_group();
    at::parallel_for(0, rows * blocks, grain_for(samples_per_task), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / blocks, q0 = (task % blocks) * kPixelBlock;
        fn(row, q0, std::min(cols, q0 + kPixelBlock));
      }
    });
  }

  // For each channel c of the row's deform group and each image's run [qa, qb) of columns within
  // [q0, q1): fn(c, padded plane of that channel and image, qa, qb).
  template <typename Fn>
  void for_each_channel_run(int64_t row, int64_t q0, int64_t q1, const Fn& fn) const {
    const int64_t width = tile_.width(), cpg = g_.in_per_deform_group(), grp = row / g_.taps();
    const scalar_t* base = padded_.const_data_ptr<scalar_t>();
    for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
      for (int64_t qa = q0; qa < q1;) {
        const int64_t b = qa / width, qb = std::min(q1, (b + 1) * width);
        fn(c, base + ((tile_.n0 + b) * g_.in_channels + c) * pad_.plane, qa, qb);
        qa = qb;
      }
    }
  }

  // Each task owns one (image, channel) plane of the padded gradient: no two threads write alike.
  void scatter_grad_input(const scalar_t* grad_columns, acc_t* padded_grad) {
    const int64_t taps = g_.taps(), width = tile_.width(), cols = tile_.cols();
    const int64_t cpg = g_.in_per_deform_group(), row_len = pad_.width;
    at::parallel_for(0, g_.in_channels * tile_.count, grain_for(taps * width), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / tile_.count, b = task % tile_.count, grp = c / cpg;
        acc_t* gx = padded_grad + ((tile_.n0 + b) * g_.in_channels + c) * pad_.plane;
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t row = grp * taps + k;
          const auto plan = plan_.at(row * cols + b * width);
          const acc_t* m = masks_.data() + row * cols + b * width;
          const scalar_t* gcol = grad_columns + (c * taps + k) * cols + b * width;
          for (int64_t l = 0; l < width; ++l) {
            const acc_t gm = static_cast<acc_t>(gcol[l]) * m[l];
            acc_t* q = gx + plan.base[l];
            q[0] += gm * plan.w[0][l];
            q[1] += gm * plan.w[1][l];
            q[row_len] += gm * plan.w[2][l];
            q[row_len + 1] += gm * plan.w[3][l];
          }
        }
      }
    });
  }

  void reduce_grad_offset_mask(const scalar_t* grad_columns, acc_t* grad_offset, acc_t* grad_mask) {
    const int64_t taps = g_.taps(), pixels = g_.pixels(), width = tile_.width(), cols = tile_.cols();
    const int64_t rows = g_.deform_groups * taps, row_len = pad_.width;
    for_each_block([&](int64_t row, int64_t q0, int64_t q1) {
      acc_t acc_y[kPixelBlock] = {}, acc_x[kPixelBlock] = {}, acc_m[kPixelBlock] = {};
      const auto plan = plan_.at(row * cols);
      for_each_channel_run(row, q0, q1, [&](int64_t c, const scalar_t* x, int64_t qa, int64_t qb) {
        const scalar_t* gcol = grad_columns + (c * taps + row % taps) * cols;
        for (int64_t q = qa; q < qb; ++q) {
          // Offset 0 marks a sample outside the map: it receives no gradient (not even NaN * 0).
          if (plan.base[q] == 0) continue;
          const acc_t w[4] = {plan.w[0][q], plan.w[1][q], plan.w[2][q], plan.w[3][q]};
          const scalar_t* corner = x + plan.base[q];
          const acc_t v[4] = {static_cast<acc_t>(corner[0]), static_cast<acc_t>(corner[1]),
                              static_cast<acc_t>(corner[row_len]), static_cast<acc_t>(corner[row_len + 1])};
          // The unmodulated weights give back the fractional position: ly = w2 + w3, lx = w1 + w3.
          acc_t dy, dx;
          bilinear_coord_grad(v, w[2] + w[3], w[1] + w[3], dy, dx);
          const acc_t gcv = static_cast<acc_t>(gcol[q]);
          acc_y[q - q0] += gcv * dy;
          acc_x[q - q0] += gcv * dx;
          acc_m[q - q0] += gcv * (w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3]);
        }
      });
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = tile_.n0 + q / width, p = tile_.p0 + q % width;
        const acc_t m = masks_[row * cols + q];
        acc_t* go = grad_offset + (n * 2 * rows + 2 * row) * pixels + p;
        go[0] = acc_y[q - q0] * m;
        go[pixels] = acc_x[q - q0] * m;
        if (grad_mask) grad_mask[(n * rows + row) * pixels + p] = acc_m[q - q0];
      }
    });
  }

  const ConvGeometry& g_;
  const PaddedPlanes pad_;
  const scalar_t* offset_;
  const scalar_t* mask_;
  const bool fold_mask_;
  ColumnTile tile_{};
  at::Tensor padded_, padded_grad_;
  Plan<acc_t> plan_;
  std::vector<acc_t> masks_;
};

at::Tensor forward_cpu(const at::Tensor& input_, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_,
                       const at::Tensor& weight_, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const ConvGeometry g =
      check_deform_conv_args(input_, offset_, mask_, weight_, bias, stride, padding, dilation, groups, deform_groups);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const std::optional<at::Tensor> bias_c = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  at::Tensor output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "modulated_deform_conv2d_cpu", [&] {
    CpuColumns<scalar_t> kernels(g, input, offset, mask, /*fold_mask=*/true);
    output = deform_conv_forward(g, input, weight, bias_c, kernels);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input_, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups,
    std::array<bool, 3> output_mask) {
  const ConvGeometry g =
      check_deform_conv_args(input_, offset_, mask_, weight_, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad_output(grad_output, input_, g);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "modulated_deform_conv2d_backward_cpu",
                                  [&] {
    CpuColumns<scalar_t> kernels(g, input, offset, mask, /*fold_mask=*/false);
    grads = deform_conv_backward(g, grad_output.contiguous(), input, offset,
                                 mask.defined() ? std::optional(mask) : std::nullopt, weight, bias, output_mask,
                                 kernels);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CPU, m) {
  m.impl("modulated_deform_conv2d", &forward_cpu);
  m.impl("modulated_deform_conv2d_backward", &backward_cpu);
}

}  // namespace mmdet_dcnv2
