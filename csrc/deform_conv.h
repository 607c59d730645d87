// Host-side contract of the modulated deformable convolution: argument checks and sizes shared by the
// CPU and CUDA implementations, and the column budget that bounds their workspace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

#include "dcn_common.h"

namespace mmdet_dcnv2 {

struct ConvGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t groups, deform_groups;
  ConvSampling sampling;

  DCN_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  DCN_HOST_DEVICE int64_t pixels() const { return out_h * out_w; }
  DCN_HOST_DEVICE int64_t plane() const { return height * width; }
  DCN_HOST_DEVICE int64_t in_per_group() const { return in_channels / groups; }
  DCN_HOST_DEVICE int64_t out_per_group() const { return out_channels / groups; }
  DCN_HOST_DEVICE int64_t in_per_deform_group() const { return in_channels / deform_groups; }

  // The offset and mask of a sample (image n, sampling row, output pixel p), where a sampling row is
  // one (deform group grp, kernel point k) pair: row = grp * taps + k, deform_groups * taps rows per
  // image. offset is (N, 2 * rows, H_out, W_out), the row's dy in channel 2 * row and its dx in the
  // next one, pixels() further on from offset_index; mask is (N, rows, H_out, W_out). index_t is the
  // kernel's index type: the caller has checked that these offsets fit it.
  template <typename index_t>
  DCN_HOST_DEVICE index_t sampling_row(index_t grp, index_t k) const {
    return grp * static_cast<index_t>(taps()) + k;
  }
  template <typename index_t>
  DCN_HOST_DEVICE index_t offset_index(index_t n, index_t row, index_t p) const {
    const index_t rows = static_cast<index_t>(deform_groups) * static_cast<index_t>(taps());
    return (n * 2 * rows + 2 * row) * static_cast<index_t>(pixels()) + p;
  }
  template <typename index_t>
  DCN_HOST_DEVICE index_t mask_index(index_t n, index_t row, index_t p) const {
    const index_t rows = static_cast<index_t>(deform_groups) * static_cast<index_t>(taps());
    return (n * rows + row) * static_cast<index_t>(pixels()) + p;
  }
};

// Checks every argument (ranks, shapes, dtypes, devices, divisibility, positive sizes) and returns the
// geometry. Errors name the argument and say what was expected and what was got.
ConvGeometry check_deform_conv_args(const at::Tensor& input, const at::Tensor& offset,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    int64_t deform_groups);

// The backward additionally checks grad_output against the forward's output shape.
void check_deform_conv_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const ConvGeometry& g);

// A call's operands, checked by check_deform_conv_args and made contiguous: what every backend's entry
// point starts from. `mask` is undefined where none was given (DCNv1).
struct ConvOperands {
  ConvGeometry g;
  at::Tensor input, offset, mask, weight;
  std::optional<at::Tensor> bias;
};

ConvOperands deform_conv_operands(const at::Tensor& input, const at::Tensor& offset,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  int64_t deform_groups);

// Reads/sets the budget in bytes of the column buffer (set with a value >= 0; returns the previous).
int64_t column_budget_bytes(int64_t new_value = -1);

// A tile of the column matrix: pixels [p0, p1) of images [n0, n0 + count). A tile spans several
// images only when it holds them whole (p0 = 0, p1 = pixels).
struct ColumnTile {
  int64_t n0, count, p0, p1;
  DCN_HOST_DEVICE int64_t width() const { return p1 - p0; }  // pixels per image in the tile
  DCN_HOST_DEVICE int64_t cols() const { return count * (p1 - p0); }
};

// Tiles covering the batch, each with at most max_bytes of columns (C_in * taps elements per
// column), whole images together where they fit, one image in pixel ranges where it does not.
std::vector<ColumnTile> column_tiles(const ConvGeometry& g, int64_t element_size, int64_t max_bytes);

// Gradients of one backward call, in the accumulation dtype (float for half types); an undefined
// tensor where a gradient was not asked for.
struct ConvGrads {
  at::Tensor input, offset, mask;
};

// The memory layout of the column matrix, chosen by the backend. Column q = b * tile.width() + (p - p0)
// is output pixel p of image n0 + b; the modulated sample of channel c (in conv group grp, index cl
// within it) at kernel point k sits at
//   kChannelMajor: (C_in * taps, cols), row c * taps + k -- the weight's own (c, k) order;
//   kPixelMajor:   (cols, C_in * taps), position grp * taps * C_in/groups + k * C_in/groups + cl --
//                  per column and tap a group's channels are contiguous, as in a channels-last input.
enum class ColumnLayout { kChannelMajor, kPixelMajor };

// What a backend provides: the sampling between the feature map and the column matrix, one tile at
// a time, in the layout it declares.
class ColumnKernels {
 public:
  virtual ~ColumnKernels() = default;
  virtual ColumnLayout layout() const { return ColumnLayout::kChannelMajor; }
  // The largest column buffer the backend works well with (the user's budget caps it further).
  virtual int64_t preferred_tile_bytes() const = 0;
  virtual void begin_tile(const ColumnTile& tile) = 0;
  virtual void fill_columns(const at::Tensor& columns) = 0;
  // grad_columns -> grads.input (accumulated), grads.offset and grads.mask (the tile's pixels).
  virtual void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) = 0;
  // After the last tile of a backward call.
  virtual void finish_backward(ConvGrads& grads) {}
};

// (B, R, C) -> (B, C, R), contiguous.
at::Tensor swap_inner_dims(const at::Tensor& t, int64_t b, int64_t r, int64_t c);

// The weight as (C_out, C_in/groups * taps) rows in the order of the columns' rows: (c, k) as stored
// for the channel-major layout, (k, c) for the pixel-major one. (Explicit sizes: C_in may be 0.)
at::Tensor weight_in_column_order(const at::Tensor& weight, const ConvGeometry& g, ColumnLayout layout);

// How the driver runs the GEMMs of a CPU call (output, grad of columns, grad of weight):
//   kMm:     at::mm/addmm (BLAS: MKL in torch's x86 builds);
//   kOneDnn: oneDNN 1x1 convolutions (forward, backward data and weights) over the pixel-major column
//            buffer viewed as a channels-last image -- oneDNN runs its widest kernels on any x86 CPU,
//            where MKL takes a generic AVX2 path on non-Intel ones.
// Chosen by a fixed rule on the CPU, dtype and layout (never by timing, which would make results
// differ run to run), overridden by MMDET_DCNV2_CPU_GEMM=mm|onednn (auto: the rule). CUDA always
// uses cuBLAS; float64, and a backend with channel-major columns, always use kMm.
// MMDET_DCNV2_CPU_GEMM=brgemm or auto (unset) leave the tiled GEMMs to that rule.
enum class CpuGemm { kMm, kOneDnn };
CpuGemm cpu_gemm_route(at::ScalarType dtype, ColumnLayout layout);
const char* cpu_gemm_name(CpuGemm route);

// Whether a CPU forward of this dtype runs fused instead (cpu/deform_conv_kernel.cpp): the columns of
// a block of output pixels filled and multiplied while they are in cache, by oneDNN's batch-reduce
// GEMM microkernel, never materialised for the whole tile. float32 where oneDNN is enabled and its JIT
// may use AVX2, unless MMDET_DCNV2_CPU_GEMM is mm or onednn (which ask for the tiled forward on that
// route).
bool cpu_fused_forward(at::ScalarType dtype);

// The device-independent part: tiling the batch under the column budget and the GEMMs with the
// weight.
at::Tensor deform_conv_forward(const ConvOperands& op, ColumnKernels& kernels);

// grad_output must be contiguous and checked (check_deform_conv_grad_output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const ConvOperands& op, const at::Tensor& grad_output, std::array<bool, 3> output_mask, ColumnKernels& kernels);

}  // namespace mmdet_dcnv2
