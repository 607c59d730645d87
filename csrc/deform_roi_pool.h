// Host-side contract of the modulated deformable RoI pooling: the geometry, argument checks and
// operands shared by the CPU and CUDA implementations, and the per-bin helpers both kernels call. The sampling
// arithmetic itself (RoI bins, adaptive grid, RoIAlign-style bilinear) lives in dcn_common.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <vector>

#include "dcn_common.h"

namespace mmdet_dcnv2 {

struct RoIPoolGeometry {
  int64_t batch, channels, height, width;  // of the input feature map
  int64_t num_rois, pooled_h, pooled_w;
  int64_t sampling_ratio;  // samples per bin side; <= 0: adaptive, ceil(bin size)
  double spatial_scale, gamma;

  DCN_HOST_DEVICE int64_t bins() const { return pooled_h * pooled_w; }
  DCN_HOST_DEVICE int64_t plane() const { return height * width; }
  std::array<int64_t, 4> output_shape() const { return {num_rois, channels, pooled_h, pooled_w}; }

  // Flat indices into the contiguous tensors, bin = ph * pooled_w + pw. index_t is the kernel's index
  // type: the caller has checked that these offsets fit it.
  // Channel c of image n of the input (N, C, H, W): the start of its plane.
  template <typename index_t>
  DCN_HOST_DEVICE index_t input_plane(index_t n, index_t c) const {
    return (n * static_cast<index_t>(channels) + c) * static_cast<index_t>(plane());
  }
  // Bin `bin` of channel c of RoI r in the output (R, C, out_h, out_w) and in grad_output.
  template <typename index_t>
  DCN_HOST_DEVICE index_t output_index(index_t r, index_t c, index_t bin) const {
    return (r * static_cast<index_t>(channels) + c) * static_cast<index_t>(bins()) + bin;
  }
  // The bin's x offset in the offsets (R, 2, out_h, out_w) of RoI r, or in their gradient; the y offset
  // is bins() further on.
  template <typename index_t>
  DCN_HOST_DEVICE index_t offset_index(index_t r, index_t bin) const {
    return r * 2 * static_cast<index_t>(bins()) + bin;
  }
};

// Checks every argument (ranks, shapes, dtypes, devices, sizes and scalars) and returns the geometry.
// Batch indices are data, not metadata: they are validated by roi_images_cpu (CPU) or skipped in the
// kernel (CUDA). Errors name the argument and say what was expected and what was got.
RoIPoolGeometry check_deform_roi_pool_args(const at::Tensor& input, const at::Tensor& rois,
                                           const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                           double spatial_scale, int64_t sampling_ratio, double gamma);

// The backward additionally checks grad_output against the forward's output shape.
void check_deform_roi_pool_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                                       const RoIPoolGeometry& g);

// A call's operands, checked by check_deform_roi_pool_args and made contiguous: what every backend's
// entry point starts from. `offset` is undefined where none was given (plain RoIAlign-style pooling).
struct RoIPoolOperands {
  RoIPoolGeometry g;
  at::Tensor input, rois, offset;
};

RoIPoolOperands deform_roi_pool_operands(const at::Tensor& input, const at::Tensor& rois,
                                         const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                         double spatial_scale, int64_t sampling_ratio, double gamma);

// The image of every RoI, read from rois[:, 0] of a CPU tensor; raises unless each is an integer in
// [0, batch). (On CUDA the same check would cost a device-to-host sync per call; see the .cu file.)
std::vector<int64_t> roi_images_cpu(const at::Tensor& rois, int64_t batch);

// The image a RoI belongs to, or -1 when its batch index is not an integer in [0, batch). The range
// test comes first and fails for NaN, so only a small whole number is ever converted to an integer.
template <typename acc_t>
DCN_HOST_DEVICE int64_t roi_batch_index(acc_t value, int64_t batch) {
  if (!(value >= acc_t(0) && value < acc_t(batch)) || dcn_floor(value) != value) return -1;
  return static_cast<int64_t>(value);
}

// The sampling grid of bin `bin` (= ph * pooled_w + pw) of RoI r. rois is the (R, 5) table, offset the
// (R, 2, out_h, out_w) normalised offsets (channel 0 = x, 1 = y) or null.
template <typename acc_t, typename scalar_t, typename index_t>
DCN_HOST_DEVICE RoIBin<acc_t> roi_pool_bin(const RoIPoolGeometry& g, const scalar_t* rois, const scalar_t* offset,
                                           index_t r, index_t bin) {
  const index_t pooled_w = static_cast<index_t>(g.pooled_w);
  const index_t ph = bin / pooled_w, pw = bin % pooled_w;
  const scalar_t* roi = rois + r * 5;
  acc_t off_x = acc_t(0), off_y = acc_t(0);
  if (offset != nullptr) {
    const scalar_t* off = offset + g.offset_index(r, bin);
    off_x = static_cast<acc_t>(off[0]);
    off_y = static_cast<acc_t>(off[g.bins()]);
  }
  return roi_bin<acc_t>(static_cast<acc_t>(roi[1]), static_cast<acc_t>(roi[2]), static_cast<acc_t>(roi[3]),
                        static_cast<acc_t>(roi[4]), ph, pw, g.pooled_h, g.pooled_w, static_cast<acc_t>(g.spatial_scale),
                        g.sampling_ratio, static_cast<acc_t>(g.gamma), off_x, off_y);
}

// A bin's output is the mean of its samples; a bin with none (degenerate RoI) pools to zero.
template <typename acc_t>
DCN_HOST_DEVICE acc_t roi_bin_count(const RoIBin<acc_t>& b) {
  const int64_t n = b.grid_h * b.grid_w;
  return static_cast<acc_t>(n > 0 ? n : 1);
}

// The corners of sample (iy, ix) of a bin, in the RoIAlign convention (clamped within one pixel of the
// map, zero beyond; a non-finite position samples zero).
template <typename acc_t, typename index_t>
DCN_HOST_DEVICE Corners<acc_t, index_t> roi_sample_corners(const RoIBin<acc_t>& b, int64_t iy, int64_t ix,
                                                           index_t height, index_t width) {
  return clamped_corners<acc_t, index_t>(b.start_y + static_cast<acc_t>(iy) * b.step_y,
                                         b.start_x + static_cast<acc_t>(ix) * b.step_x, height, width);
}

// clamped_corners yields all four corners or none (a sample outside the band around the map).
template <typename acc_t, typename index_t>
DCN_HOST_DEVICE bool no_sample(const Corners<acc_t, index_t>& c) {
  return c.idx[0] < 0;
}

}  // namespace mmdet_dcnv2
