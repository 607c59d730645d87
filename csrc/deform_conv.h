// Host-side contract of the modulated deformable convolution: argument checks and sizes shared by the
// CPU and CUDA implementations, and the column budget that bounds their workspace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

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

// How many images one chunk of the batch may hold so that its column buffer (in_channels * taps *
// pixels elements per image) stays within the user-settable budget; at least one.
int64_t images_per_chunk(const ConvGeometry& g, int64_t element_size);

// Reads/sets the budget in bytes (set with a value >= 0; returns the previous one).
int64_t column_budget_bytes(int64_t new_value = -1);

// Gradients of one backward call, in the accumulation dtype (float for half types); an undefined
// tensor where a gradient was not asked for. Backends write them chunk by chunk.
struct ConvGrads {
  at::Tensor input, offset, mask;
};

// What a backend provides: the sampling between the feature map and the column matrix, one chunk of
// images [n0, n0 + count) at a time. Columns are (C_in * taps, count * pixels): row c * taps + k,
// column b * pixels + p holds kernel point k of output pixel p of image n0 + b, channel c, modulated.
class ColumnKernels {
 public:
  virtual ~ColumnKernels() = default;
  virtual void begin_chunk(int64_t n0, int64_t count) = 0;
  virtual void fill_columns(const at::Tensor& columns) = 0;
  // grad_columns -> grads.input (accumulated), grads.offset and grads.mask (this chunk's images).
  virtual void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) = 0;
};

// The device-independent part: chunking the batch under the column budget and the GEMMs with the
// weight. Tensors must be contiguous and checked.
at::Tensor deform_conv_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, ColumnKernels& kernels);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    std::array<bool, 3> output_mask, ColumnKernels& kernels);

}  // namespace mmdet_dcnv2
