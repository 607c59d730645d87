// The device-independent half of the modulated deformable RoI pooling (see deform_roi_pool.h):
// argument checks and operands shared by both backends, and the CPU validation of the RoIs' batch
// indices.
#include "deform_roi_pool.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "arg_checks.h"

namespace mmdet_dcnv2 {

RoIPoolGeometry check_deform_roi_pool_args(const at::Tensor& input, const at::Tensor& rois,
                                           const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                           double spatial_scale, int64_t sampling_ratio, double gamma) {
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be 4-D (N, C, H, W), got shape ", shape_str(input.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), "input must be a floating-point tensor, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "rois must have shape (R, 5), rows of (batch_index, x1, y1, x2, y2), got shape ",
                    shape_str(rois.sizes()));
  check_same_kind(rois, "rois", input);
  check_pair(output_size, "output_size", 1);
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0,
                    "spatial_scale must be a positive finite number (1 / feature stride), got ", spatial_scale);
  // Adaptive sampling caps a side at kMaxRoIGrid samples; an explicit ratio may not ask for more.
  TORCH_CHECK_VALUE(sampling_ratio <= kMaxRoIGrid, "sampling_ratio must be <= ", kMaxRoIGrid,
                    " (<= 0 means adaptive: ceil(bin size) samples per side), got ", sampling_ratio);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "gamma must be finite, got ", gamma);

  RoIPoolGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.num_rois = rois.size(0);
  g.pooled_h = output_size[0];
  g.pooled_w = output_size[1];
  g.sampling_ratio = sampling_ratio;
  g.spatial_scale = spatial_scale;
  g.gamma = gamma;

  if (offset.has_value()) {
    check_same_kind(*offset, "offset", input);
    const std::vector<int64_t> shape{g.num_rois, 2, g.pooled_h, g.pooled_w};
    TORCH_CHECK_VALUE(offset->sizes() == at::IntArrayRef(shape), "offset must have shape ", shape_str(shape),
                      " (R, 2, out_h, out_w), got ", shape_str(offset->sizes()));
  }
  return g;
}

void check_deform_roi_pool_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                                       const RoIPoolGeometry& g) {
  check_same_kind(grad_output, "grad_output", input);
  const std::array<int64_t, 4> shape = g.output_shape();
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(shape), "grad_output must have shape ", shape_str(shape),
                    ", got ", shape_str(grad_output.sizes()));
}

RoIPoolOperands deform_roi_pool_operands(const at::Tensor& input, const at::Tensor& rois,
                                         const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                         double spatial_scale, int64_t sampling_ratio, double gamma) {
  const RoIPoolGeometry g =
      check_deform_roi_pool_args(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma);
  return {g, input.contiguous(), rois.contiguous(), offset.has_value() ? offset->contiguous() : at::Tensor()};
}

std::vector<int64_t> roi_images_cpu(const at::Tensor& rois, int64_t batch) {
  TORCH_INTERNAL_ASSERT(rois.device().is_cpu() && rois.dim() == 2 && rois.size(1) == 5);
  const at::Tensor index = rois.select(1, 0).contiguous();
  std::vector<int64_t> images(index.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, index.scalar_type(), "roi_images_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = index.const_data_ptr<scalar_t>();
    for (size_t r = 0; r < images.size(); ++r) {
      const acc_t value = static_cast<acc_t>(data[r]);
      images[r] = roi_batch_index(value, batch);
      TORCH_CHECK_VALUE(images[r] >= 0, "rois[:, 0] must hold batch indices, integers in [0, ", batch,
                        ") for an input of ", batch, " images; got ", value, " in row ", r);
    }
  });
  return images;
}

}  // namespace mmdet_dcnv2
