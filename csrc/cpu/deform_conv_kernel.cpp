// Modulated deformable convolution on the CPU.
//
// Forward: for a chunk of images, build a sampling plan once per (deform group, kernel point, output
// pixel) -- the four corner offsets and bilinear weights with the mask folded in -- and fill the
// columns (C_in * kh * kw rows, pixels columns) from it for every channel of the group, in parallel;
// then one GEMM per conv group. The plan is what the incumbents lack: they recompute the bilinear
// weights for every channel.
//
// Backward: grad_columns = W^T grad_out and grad_weight = grad_out columns^T (GEMMs). grad_input is a
// scatter of grad_columns through the plan, parallel over channel planes so that each thread owns the
// planes it writes; grad_offset / grad_mask reduce over the channels of a deform group in a fixed
// order. No atomics: results are bitwise identical run to run, whatever the thread count (ATen's
// GEMMs aside, which may round differently at different thread counts).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../deform_conv.h"

namespace mmdet_dcnv2 {
namespace {

// Pixels handled per parallel task: a block of the plan stays in L1 while every channel of the
// group is filled from it.
constexpr int64_t kPixelBlock = 256;

template <typename acc_t>
using Plan = Corners<acc_t, int32_t>;

// plan[(grp * taps + k) * cols + b * pixels + p] for the images [n0, n0 + count) of a chunk.
// With fold_mask, the mask is folded into the weights (forward); otherwise weights stay unmodulated
// and the mask is kept apart in `masks` (backward needs both).
template <typename scalar_t, typename acc_t>
void build_plan(const ConvGeometry& g, const scalar_t* offset, const scalar_t* mask, int64_t n0, int64_t count,
                bool fold_mask, std::vector<Plan<acc_t>>& plan, std::vector<acc_t>& masks) {
  const int64_t taps = g.taps(), pixels = g.pixels(), cols = count * pixels;
  const int64_t rows = g.deform_groups * taps;
  plan.resize(rows * cols);
  if (!fold_mask) masks.resize(rows * cols);
  at::parallel_for(0, rows * count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / count, b = task % count;  // row = grp * taps + k
      const int64_t k = row % taps, ki = k / g.kernel_w, kj = k % g.kernel_w;
      const int64_t n = n0 + b;
      const scalar_t* off = offset + (n * 2 * rows + 2 * row) * pixels;
      const scalar_t* msk = mask ? mask + (n * rows + row) * pixels : nullptr;
      Plan<acc_t>* out = plan.data() + row * cols + b * pixels;
      for (int64_t p = 0; p < pixels; ++p) {
        const int64_t oy = p / g.out_w, ox = p % g.out_w;
        const acc_t y = conv_base_y<acc_t>(g.sampling, oy, ki) + static_cast<acc_t>(off[p]);
        const acc_t x = conv_base_x<acc_t>(g.sampling, ox, kj) + static_cast<acc_t>(off[pixels + p]);
        out[p] = zero_border_corners<acc_t, int32_t>(y, x, static_cast<int32_t>(g.height),
                                                      static_cast<int32_t>(g.width));
        const acc_t m = msk ? static_cast<acc_t>(msk[p]) : acc_t(1);
        if (fold_mask) {
          if (msk) scale_corners(out[p], m);
        } else {
          masks[row * cols + b * pixels + p] = m;
        }
      }
    }
  });
}

// columns[(c * taps + k) * cols + b * pixels + p] = modulated sample of channel c, image n0 + b.
// `masks` is null for a plan with the mask folded in.
template <typename scalar_t, typename acc_t>
void fill_columns(const ConvGeometry& g, const scalar_t* input, int64_t n0, int64_t count,
                  const std::vector<Plan<acc_t>>& plan, const acc_t* masks, scalar_t* columns) {
  const int64_t taps = g.taps(), pixels = g.pixels(), cols = count * pixels, plane = g.height * g.width;
  const int64_t blocks = (cols + kPixelBlock - 1) / kPixelBlock;
  const int64_t cpg = g.in_per_deform_group();
  at::parallel_for(0, g.deform_groups * taps * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks, q0 = (task % blocks) * kPixelBlock;
      const int64_t q1 = std::min(cols, q0 + kPixelBlock);
      const int64_t grp = row / taps, k = row % taps;
      const Plan<acc_t>* pl = plan.data() + row * cols;
      const acc_t* m = masks ? masks + row * cols : nullptr;
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        scalar_t* col = columns + (c * taps + k) * cols;
        for (int64_t q = q0; q < q1;) {
          // Walk one image's run of pixels at a time so the plane pointer is fixed in the inner loop.
          const int64_t b = q / pixels, q_end = std::min(q1, (b + 1) * pixels);
          const scalar_t* x = input + ((n0 + b) * g.in_channels + c) * plane;
          if (m) {
            for (; q < q_end; ++q) col[q] = static_cast<scalar_t>(corners_gather<acc_t>(x, pl[q]) * m[q]);
          } else {
            for (; q < q_end; ++q) col[q] = static_cast<scalar_t>(corners_gather<acc_t>(x, pl[q]));
          }
        }
      }
    }
  });
}

// grad_input planes of the chunk's images += grad_columns scattered through the (mask-folded) plan.
template <typename scalar_t, typename acc_t>
void scatter_grad_input(const ConvGeometry& g, int64_t n0, int64_t count, const std::vector<Plan<acc_t>>& plan,
                        const std::vector<acc_t>& masks, const scalar_t* grad_columns, acc_t* grad_input) {
  const int64_t taps = g.taps(), pixels = g.pixels(), cols = count * pixels, plane = g.height * g.width;
  const int64_t cpg = g.in_per_deform_group();
  auto add = [](acc_t* ptr, acc_t v) { *ptr += v; };
  at::parallel_for(0, g.in_channels * count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / count, b = task % count, grp = c / cpg;
      acc_t* gx = grad_input + ((n0 + b) * g.in_channels + c) * plane;
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t row = grp * taps + k;
        const Plan<acc_t>* pl = plan.data() + row * cols + b * pixels;
        const acc_t* m = masks.data() + row * cols + b * pixels;
        const scalar_t* gcol = grad_columns + (c * taps + k) * cols + b * pixels;
        for (int64_t p = 0; p < pixels; ++p) {
          corners_scatter(gx, pl[p], static_cast<acc_t>(gcol[p]) * m[p], add);
        }
      }
    }
  });
}

// grad_offset (dy, dx) and grad_mask of the chunk's images: reductions over each group's channels.
template <typename scalar_t, typename acc_t>
void reduce_grad_offset_mask(const ConvGeometry& g, const scalar_t* input, int64_t n0, int64_t count,
                             const std::vector<Plan<acc_t>>& plan, const std::vector<acc_t>& masks,
                             const scalar_t* grad_columns, acc_t* grad_offset, acc_t* grad_mask) {
  const int64_t taps = g.taps(), pixels = g.pixels(), cols = count * pixels, plane = g.height * g.width;
  const int64_t rows = g.deform_groups * taps;
  const int64_t blocks = (cols + kPixelBlock - 1) / kPixelBlock;
  const int64_t cpg = g.in_per_deform_group();
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t acc_y[kPixelBlock], acc_x[kPixelBlock], acc_m[kPixelBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks, q0 = (task % blocks) * kPixelBlock;
      const int64_t q1 = std::min(cols, q0 + kPixelBlock);
      const int64_t grp = row / taps, k = row % taps;
      const Plan<acc_t>* pl = plan.data() + row * cols;
      std::fill(acc_y, acc_y + kPixelBlock, acc_t(0));
      std::fill(acc_x, acc_x + kPixelBlock, acc_t(0));
      std::fill(acc_m, acc_m + kPixelBlock, acc_t(0));
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        const scalar_t* gcol = grad_columns + (c * taps + k) * cols;
        for (int64_t q = q0; q < q1;) {
          const int64_t b = q / pixels, q_end = std::min(q1, (b + 1) * pixels);
          const scalar_t* x = input + ((n0 + b) * g.in_channels + c) * plane;
          for (; q < q_end; ++q) {
            const Plan<acc_t>& corners = pl[q];
            if (corners.idx[0] < 0 && corners.idx[1] < 0 && corners.idx[2] < 0 && corners.idx[3] < 0) continue;
            acc_t v, dy, dx;
            corners_gather_with_grad<acc_t>(x, corners, v, dy, dx);
            const acc_t gc = static_cast<acc_t>(gcol[q]);
            acc_y[q - q0] += gc * dy;
            acc_x[q - q0] += gc * dx;
            acc_m[q - q0] += gc * v;
          }
        }
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / pixels, p = q % pixels, n = n0 + b;
        const acc_t m = masks[row * cols + q];
        acc_t* go = grad_offset + (n * 2 * rows + 2 * row) * pixels;
        go[p] = acc_y[q - q0] * m;
        go[pixels + p] = acc_x[q - q0] * m;
        if (grad_mask) grad_mask[(n * rows + row) * pixels + p] = acc_m[q - q0];
      }
    }
  });
}

// The plan stores offsets within one channel plane as int32 (half the memory traffic of int64).
void check_plane_fits_int32(const ConvGeometry& g) {
  TORCH_CHECK_VALUE(g.plane() < (int64_t(1) << 31), "input planes of more than 2^31 elements (", g.height, " x ",
                    g.width, ") are not supported on CPU");
}

template <typename scalar_t>
class CpuColumns final : public ColumnKernels {
  using acc_t = at::opmath_type<scalar_t>;

 public:
  // fold_mask: forward only needs modulated samples, so the mask goes into the plan's weights;
  // backward keeps it apart (the mask gradient needs the unmodulated samples).
  CpuColumns(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
             bool fold_mask)
      : g_(g),
        input_(input.const_data_ptr<scalar_t>()),
        offset_(offset.const_data_ptr<scalar_t>()),
        mask_(mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr),
        fold_mask_(fold_mask) {}

  void begin_chunk(int64_t n0, int64_t count) override {
    n0_ = n0;
    count_ = count;
    build_plan<scalar_t, acc_t>(g_, offset_, mask_, n0, count, fold_mask_, plan_, masks_);
  }

  void fill_columns(const at::Tensor& columns) override {
    mmdet_dcnv2::fill_columns<scalar_t, acc_t>(g_, input_, n0_, count_, plan_, fold_mask_ ? nullptr : masks_.data(),
                                               columns.data_ptr<scalar_t>());
  }

  void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) override {
    TORCH_INTERNAL_ASSERT(!fold_mask_, "backprop_columns needs an unfolded plan");
    const scalar_t* gc = grad_columns.const_data_ptr<scalar_t>();
    if (grads.input.defined()) {
      scatter_grad_input<scalar_t, acc_t>(g_, n0_, count_, plan_, masks_, gc, grads.input.data_ptr<acc_t>());
    }
    if (grads.offset.defined()) {
      reduce_grad_offset_mask<scalar_t, acc_t>(g_, input_, n0_, count_, plan_, masks_, gc,
                                               grads.offset.data_ptr<acc_t>(),
                                               grads.mask.defined() ? grads.mask.data_ptr<acc_t>() : nullptr);
    }
  }

 private:
  const ConvGeometry& g_;
  const scalar_t* input_;
  const scalar_t* offset_;
  const scalar_t* mask_;
  const bool fold_mask_;
  int64_t n0_ = 0, count_ = 0;
  std::vector<Plan<acc_t>> plan_;
  std::vector<acc_t> masks_;
};

at::Tensor forward_cpu(const at::Tensor& input_, const at::Tensor& offset_, const std::optional<at::Tensor>& mask_,
                       const at::Tensor& weight_, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const ConvGeometry g =
      check_deform_conv_args(input_, offset_, mask_, weight_, bias, stride, padding, dilation, groups, deform_groups);
  check_plane_fits_int32(g);
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
  check_plane_fits_int32(g);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "modulated_deform_conv2d_backward_cpu",
                                  [&] {
    CpuColumns<scalar_t> kernels(g, input, offset, mask, /*fold_mask=*/false);
    grads = deform_conv_backward(g, grad_output.contiguous(), input, offset, mask_.has_value() ? std::optional(mask) : std::nullopt,
                                 weight, bias, output_mask, kernels);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CPU, m) {
  m.impl("modulated_deform_conv2d", &forward_cpu);
  m.impl("modulated_deform_conv2d_backward", &backward_cpu);
}

}  // namespace mmdet_dcnv2
