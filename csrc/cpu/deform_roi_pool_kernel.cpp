// Modulated deformable RoI pooling on the CPU.
//
// Each output bin averages a grid of RoIAlign-style bilinear samples (dcn_common.h). A sample's four
// corners and weights are the same for every channel, so they are computed once, a block of samples
// at a time, and then applied to each channel while the block is hot in L1.
//
// Forward: parallel over (RoI, bin). Backward, with no atomics, so results are bitwise identical run
// to run whatever the thread count:
// - grad_input: parallel over (image, block of channels); a task owns those planes and scatters every
//   RoI of its image into them, RoIs in increasing order, so each element sums in a fixed order;
// - grad_offset: parallel over (RoI, bin), reducing over channels in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../data_or_null.h"
#include "../deform_roi_pool.h"

namespace mmdet_dcnv2 {
namespace {

// Samples per block: their corners (about 5 KiB) stay in L1 while every channel reads them.
constexpr int64_t kSampleBlock = 64;

template <typename acc_t>
using Sample = Corners<acc_t, int64_t>;

// Calls fn(samples, count) for successive blocks of a bin's samples (row-major over its grid),
// leaving out samples that fall outside the band around the map: they add nothing, in either pass.
template <typename acc_t, typename Fn>
void for_each_sample_block(const RoIBin<acc_t>& b, const RoIPoolGeometry& g, Fn&& fn) {
  Sample<acc_t> block[kSampleBlock];
  const int64_t total = b.grid_h * b.grid_w;
  for (int64_t first = 0; first < total; first += kSampleBlock) {
    const int64_t last = std::min(total, first + kSampleBlock);
    int64_t count = 0;
    for (int64_t s = first; s < last; ++s) {
      block[count] = roi_sample_corners<acc_t, int64_t>(b, s / b.grid_w, s % b.grid_w, g.height, g.width);
      if (!no_sample(block[count])) ++count;
    }
    if (count > 0) fn(static_cast<const Sample<acc_t>*>(block), count);
  }
}

template <typename scalar_t>
void pool_forward(const RoIPoolGeometry& g, const scalar_t* input, const scalar_t* rois, const scalar_t* offset,
                  const std::vector<int64_t>& images, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = g.bins(), plane = g.plane(), channels = g.channels;
  at::parallel_for(0, g.num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(channels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / bins, bin = task % bins;
      const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, r, bin);
      const scalar_t* x = input + g.input_plane(images[r], int64_t(0));
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for_each_sample_block(b, g, [&](const Sample<acc_t>* samples, int64_t count) {
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* xc = x + c * plane;
          acc_t s = acc_t(0);
          for (int64_t j = 0; j < count; ++j) s += corners_gather<acc_t>(xc, samples[j]);
          sums[c] += s;
        }
      });
      const acc_t count = roi_bin_count(b);
      scalar_t* out = output + g.output_index(r, int64_t(0), bin);
      for (int64_t c = 0; c < channels; ++c) out[c * bins] = static_cast<scalar_t>(sums[c] / count);
    }
  });
}

// RoI indices grouped by image, increasing within an image: order[starts[n] .. starts[n + 1]).
struct RoIsByImage {
  std::vector<int64_t> order, starts;
};

RoIsByImage group_by_image(const std::vector<int64_t>& images, int64_t batch) {
  RoIsByImage groups;
  groups.starts.assign(batch + 1, 0);
  for (const int64_t n : images) ++groups.starts[n + 1];
  for (int64_t n = 0; n < batch; ++n) groups.starts[n + 1] += groups.starts[n];
  groups.order.resize(images.size());
  std::vector<int64_t> next(groups.starts.begin(), groups.starts.end() - 1);
  for (int64_t r = 0; r < static_cast<int64_t>(images.size()); ++r) groups.order[next[images[r]]++] = r;
  return groups;
}

// Channels per grad_input task: enough tasks to keep the threads busy when there are few images,
// yet enough channels per task to amortise the corners, which each task computes for itself. The
// result does not depend on it: every plane element still sums in RoI, bin, sample order.
int64_t channels_per_task(const RoIPoolGeometry& g) {
  constexpr int64_t kMinChannels = 8;
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t blocks_per_image = std::max<int64_t>(1, (wanted_tasks + g.batch - 1) / std::max<int64_t>(1, g.batch));
  const int64_t per_task = (g.channels + blocks_per_image - 1) / blocks_per_image;
  return std::max<int64_t>(1, std::min(g.channels, std::max(per_task, kMinChannels)));
}

template <typename scalar_t, typename acc_t>
void scatter_grad_input(const RoIPoolGeometry& g, const scalar_t* rois, const scalar_t* offset,
                        const std::vector<int64_t>& images, const scalar_t* grad_output, acc_t* grad_input) {
  const int64_t bins = g.bins(), plane = g.plane(), channels = g.channels;
  const RoIsByImage groups = group_by_image(images, g.batch);
  const int64_t per_task = channels_per_task(g);
  const int64_t blocks = (channels + per_task - 1) / per_task;
  auto add = [](acc_t* ptr, acc_t v) { *ptr += v; };
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grads(per_task);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * per_task;
      const int64_t width = std::min(channels, c0 + per_task) - c0;
      acc_t* gx = grad_input + g.input_plane(n, c0);
      for (int64_t k = groups.starts[n]; k < groups.starts[n + 1]; ++k) {
        const int64_t r = groups.order[k];
        for (int64_t bin = 0; bin < bins; ++bin) {
          const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, r, bin);
          const acc_t count = roi_bin_count(b);
          const scalar_t* go = grad_output + g.output_index(r, c0, bin);
          for (int64_t c = 0; c < width; ++c) grads[c] = static_cast<acc_t>(go[c * bins]) / count;
          for_each_sample_block(b, g, [&](const Sample<acc_t>* samples, int64_t num) {
            for (int64_t c = 0; c < width; ++c) {
              acc_t* gxc = gx + c * plane;
              for (int64_t j = 0; j < num; ++j) corners_scatter(gxc, samples[j], grads[c], add);
            }
          });
        }
      }
    }
  });
}

template <typename scalar_t>
void reduce_grad_offset(const RoIPoolGeometry& g, const scalar_t* input, const scalar_t* rois, const scalar_t* offset,
                        const std::vector<int64_t>& images, const scalar_t* grad_output, scalar_t* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = g.bins(), plane = g.plane(), channels = g.channels;
  const acc_t gamma = static_cast<acc_t>(g.gamma);
  at::parallel_for(0, g.num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / bins, bin = task % bins;
      const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, r, bin);
      const scalar_t* x = input + g.input_plane(images[r], int64_t(0));
      const scalar_t* go = grad_output + g.output_index(r, int64_t(0), bin);
      acc_t d_y = acc_t(0), d_x = acc_t(0);
      bool sampled = false;
      for_each_sample_block(b, g, [&](const Sample<acc_t>* samples, int64_t count) {
        sampled = true;
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* xc = x + c * plane;
          acc_t s_y = acc_t(0), s_x = acc_t(0);
          for (int64_t j = 0; j < count; ++j) {
            acc_t v, dy, dx;
            corners_gather_with_grad<acc_t>(xc, samples[j], v, dy, dx);
            s_y += dy;
            s_x += dx;
          }
          const acc_t gc = static_cast<acc_t>(go[c * bins]);
          d_y += gc * s_y;
          d_x += gc * s_x;
        }
      });
      // A unit of normalised offset moves every sample of the bin by gamma * the RoI's size. A bin that
      // sampled nothing gets an exact zero: its RoI's size may be NaN or infinite.
      const acc_t count = roi_bin_count(b);
      scalar_t* out = grad_offset + g.offset_index(r, bin);
      out[0] = static_cast<scalar_t>(sampled ? gamma * b.roi_w * d_x / count : acc_t(0));
      out[bins] = static_cast<scalar_t>(sampled ? gamma * b.roi_h * d_y / count : acc_t(0));
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                       at::IntArrayRef output_size, double spatial_scale, int64_t sampling_ratio, double gamma) {
  const RoIPoolOperands op =
      deform_roi_pool_operands(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma);
  const RoIPoolGeometry& g = op.g;
  const std::vector<int64_t> images = roi_images_cpu(op.rois, g.batch);
  at::Tensor output = at::empty(g.output_shape(), op.input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(), "deform_roi_pool_cpu", [&] {
    pool_forward<scalar_t>(g, op.input.const_data_ptr<scalar_t>(), op.rois.const_data_ptr<scalar_t>(),
                           data_or_null<scalar_t>(op.offset), images, output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output_, const at::Tensor& input,
                                                const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                at::IntArrayRef output_size, double spatial_scale,
                                                int64_t sampling_ratio, double gamma, std::array<bool, 2> output_mask) {
  const RoIPoolOperands op =
      deform_roi_pool_operands(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma);
  const RoIPoolGeometry& g = op.g;
  check_deform_roi_pool_grad_output(grad_output_, op.input, g);
  const bool need_input = output_mask[0], need_offset = output_mask[1] && op.offset.defined();
  const at::Tensor grad_output = grad_output_.contiguous();
  const std::vector<int64_t> images = roi_images_cpu(op.rois, g.batch);

  // grad_input accumulates in opmath (float for half types); grad_offset is written once per element.
  const auto options = op.input.options();
  const auto acc_options = options.dtype(at::toOpMathType(op.input.scalar_type()));
  at::Tensor grad_input = need_input ? at::zeros(op.input.sizes(), acc_options) : at::empty({0}, options);
  at::Tensor grad_offset = need_offset ? at::empty(op.offset.sizes(), options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, op.input.scalar_type(), "deform_roi_pool_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* rois_ptr = op.rois.const_data_ptr<scalar_t>();
        const scalar_t* offset_ptr = data_or_null<scalar_t>(op.offset);
        const scalar_t* gout_ptr = grad_output.const_data_ptr<scalar_t>();
        if (need_input) {
          scatter_grad_input<scalar_t, acc_t>(g, rois_ptr, offset_ptr, images, gout_ptr, grad_input.data_ptr<acc_t>());
        }
        if (need_offset) {
          reduce_grad_offset<scalar_t>(g, op.input.const_data_ptr<scalar_t>(), rois_ptr, offset_ptr, images, gout_ptr,
                                       grad_offset.data_ptr<scalar_t>());
        }
      });
  return {grad_input.to(op.input.scalar_type()), grad_offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CPU, m) {
  m.impl("deform_roi_pool", &forward_cpu);
  m.impl("deform_roi_pool_backward", &backward_cpu);
}

}  // namespace mmdet_dcnv2
