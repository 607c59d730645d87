// Modulated deformable RoI pooling on CUDA: the element functions of dcn_common.h (and the per-bin
// helpers of deform_roi_pool.h) in grid-stride kernels.
//
// One thread handles one (RoI, block of kChannels channels, bin): it computes each sample's corners
// and weights once and applies them to every channel of its block, accumulating in opmath (float for
// half types). Consecutive threads take consecutive bins, so output and grad_output accesses coalesce.
//
// Batch indices are not validated here: reading them on the host would cost a device-to-host sync
// per call. A RoI whose batch index is not an integer in [0, N) (NaN included) pools to zeros and
// receives no gradient; it never reads or writes out of bounds. (The CPU kernel raises instead.)
//
// The backward scatters into grad_input with atomics, and into grad_offset when a RoI's channels are
// split over several threads: it is nondeterministic, and torch.use_deterministic_algorithms(True)
// raises, as for other such CUDA ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <tuple>

#include "../deform_roi_pool.h"
#include "grid_stride.cuh"

namespace mmdet_dcnv2 {
namespace {

constexpr int kChannels = 4;  // channels per thread sharing one computation of each sample's corners

template <typename index_t>
struct Item {
  index_t r, c_begin, bin;
  int width;  // channels of this item's block: kChannels, or fewer in the last block
};

// item = (r * channel_blocks + cblock) * bins + bin: bins fastest.
template <typename index_t>
__device__ __forceinline__ Item<index_t> decompose(index_t item, const RoIPoolGeometry& g, index_t channel_blocks) {
  const index_t bins = static_cast<index_t>(g.bins());
  Item<index_t> it;
  it.bin = item % bins;
  item /= bins;
  it.c_begin = (item % channel_blocks) * kChannels;
  it.r = item / channel_blocks;
  it.width = static_cast<int>(min(static_cast<index_t>(kChannels), static_cast<index_t>(g.channels) - it.c_begin));
  return it;
}

template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ RoIBin<acc_t> item_bin(const Item<index_t>& it, const RoIPoolGeometry& g,
                                                  const scalar_t* rois, const scalar_t* offset) {
  const index_t pw = static_cast<index_t>(g.pooled_w);
  return roi_pool_bin<acc_t>(g, rois, offset, it.r, it.bin / pw, it.bin % pw);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(index_t items, RoIPoolGeometry g, index_t channel_blocks,
                               const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
                               const scalar_t* __restrict__ offset, scalar_t* __restrict__ output) {
  const index_t plane = static_cast<index_t>(g.plane()), bins = static_cast<index_t>(g.bins());
  const index_t channels = static_cast<index_t>(g.channels);
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, channel_blocks);
    acc_t sums[kChannels] = {};
    acc_t count = acc_t(1);
    const int64_t n = roi_batch_index(static_cast<acc_t>(rois[it.r * 5]), g.batch);
    if (n >= 0) {
      const RoIBin<acc_t> b = item_bin<scalar_t, acc_t>(it, g, rois, offset);
      count = roi_bin_count(b);
      const scalar_t* x = input + (static_cast<index_t>(n) * channels + it.c_begin) * plane;
      for (int64_t iy = 0; iy < b.grid_h; ++iy) {
        for (int64_t ix = 0; ix < b.grid_w; ++ix) {
          const Corners<acc_t, index_t> corners = roi_sample_corners<acc_t, index_t>(b, iy, ix, height, width);
          if (no_sample(corners)) continue;
#pragma unroll
          for (int j = 0; j < kChannels; ++j) {
            if (j < it.width) sums[j] += corners_gather<acc_t>(x + j * plane, corners);
          }
        }
      }
    }
    scalar_t* out = output + (it.r * channels + it.c_begin) * bins + it.bin;
#pragma unroll
    for (int j = 0; j < kChannels; ++j) {
      if (j < it.width) out[j * bins] = static_cast<scalar_t>(sums[j] / count);
    }
  }
}

// grad_input (when non-null) += the bin's gradient scattered through each sample's weights;
// grad_offset (when non-null) = the channels' sum of grad * d(sample)/d(offset).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_kernel(index_t items, RoIPoolGeometry g, index_t channel_blocks,
                                const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
                                const scalar_t* __restrict__ offset, const scalar_t* __restrict__ grad_output,
                                acc_t* __restrict__ grad_input, acc_t* __restrict__ grad_offset) {
  const index_t plane = static_cast<index_t>(g.plane()), bins = static_cast<index_t>(g.bins());
  const index_t channels = static_cast<index_t>(g.channels);
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  auto atomic_add = [](acc_t* ptr, acc_t v) { gpuAtomicAdd(ptr, v); };
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, channel_blocks);
    const int64_t n = roi_batch_index(static_cast<acc_t>(rois[it.r * 5]), g.batch);
    if (n < 0) continue;  // grad_offset is zero-initialised: nothing to write
    const RoIBin<acc_t> b = item_bin<scalar_t, acc_t>(it, g, rois, offset);
    const acc_t count = roi_bin_count(b);
    const index_t plane0 = (static_cast<index_t>(n) * channels + it.c_begin) * plane;
    const scalar_t* gout = grad_output + (it.r * channels + it.c_begin) * bins + it.bin;
    acc_t grads[kChannels];
#pragma unroll
    for (int j = 0; j < kChannels; ++j) grads[j] = j < it.width ? static_cast<acc_t>(gout[j * bins]) / count : acc_t(0);

    acc_t d_y = acc_t(0), d_x = acc_t(0);
    bool sampled = false;
    for (int64_t iy = 0; iy < b.grid_h; ++iy) {
      for (int64_t ix = 0; ix < b.grid_w; ++ix) {
        const Corners<acc_t, index_t> corners = roi_sample_corners<acc_t, index_t>(b, iy, ix, height, width);
        if (no_sample(corners)) continue;
        sampled = true;
#pragma unroll
        for (int j = 0; j < kChannels; ++j) {
          if (j >= it.width) continue;
          if (grad_input) corners_scatter(grad_input + plane0 + j * plane, corners, grads[j], atomic_add);
          if (grad_offset) {
            acc_t v, dy, dx;
            corners_gather_with_grad<acc_t>(input + plane0 + j * plane, corners, v, dy, dx);
            d_y += grads[j] * dy;
            d_x += grads[j] * dx;
          }
        }
      }
    }
    // A unit of normalised offset moves every sample by gamma * the RoI's size. A bin that sampled
    // nothing adds nothing: its RoI's size may be NaN or infinite.
    if (!grad_offset || !sampled) continue;
    const acc_t gamma = static_cast<acc_t>(g.gamma);
    acc_t* go = grad_offset + it.r * 2 * bins + it.bin;
    if (channel_blocks == 1) {  // this thread saw every channel: no other writer
      go[0] = gamma * b.roi_w * d_x;
      go[bins] = gamma * b.roi_h * d_y;
    } else {
      gpuAtomicAdd(go, gamma * b.roi_w * d_x);
      gpuAtomicAdd(go + bins, gamma * b.roi_h * d_y);
    }
  }
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

int64_t channel_blocks_of(const RoIPoolGeometry& g) { return (g.channels + kChannels - 1) / kChannels; }

at::Tensor forward_cuda(const at::Tensor& input_, const at::Tensor& rois_, const std::optional<at::Tensor>& offset_,
                        at::IntArrayRef output_size, double spatial_scale, int64_t sampling_ratio, double gamma) {
  const RoIPoolGeometry g =
      check_deform_roi_pool_args(input_, rois_, offset_, output_size, spatial_scale, sampling_ratio, gamma);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  at::Tensor output = at::empty({g.num_rois, g.channels, g.pooled_h, g.pooled_w}, input.options());
  if (output.numel() == 0) return output;
  const int64_t channel_blocks = channel_blocks_of(g), items = g.num_rois * channel_blocks * g.bins();
  const int64_t offset_numel = offset.defined() ? offset.numel() : 0;
  const bool wide = needs_wide_index({input.numel(), output.numel(), rois.numel(), offset_numel, items});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_roi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, acc_t, index_t><<<blocks_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          items, g, channel_blocks, input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
          data_or_null<scalar_t>(offset), output.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    wide ? launch(int64_t(0)) : launch(int32_t(0));
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                                                 const at::Tensor& rois_, const std::optional<at::Tensor>& offset_,
                                                 at::IntArrayRef output_size, double spatial_scale,
                                                 int64_t sampling_ratio, double gamma,
                                                 std::array<bool, 2> output_mask) {
  const RoIPoolGeometry g =
      check_deform_roi_pool_args(input_, rois_, offset_, output_size, spatial_scale, sampling_ratio, gamma);
  check_deform_roi_pool_grad_output(grad_output_, input_, g);
  const c10::cuda::CUDAGuard guard(input_.device());
  const bool need_input = output_mask[0], need_offset = output_mask[1] && offset_.has_value();
  const at::Tensor input = input_.contiguous(), rois = rois_.contiguous(), grad_output = grad_output_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const int64_t channel_blocks = channel_blocks_of(g), items = g.num_rois * channel_blocks * g.bins();

  // Both gradients are sums of atomic adds: accumulate them in opmath (float for half types).
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor grad_input = need_input ? at::zeros(input.sizes(), acc_options) : at::Tensor();
  at::Tensor grad_offset = need_offset ? at::zeros(offset.sizes(), acc_options) : at::Tensor();
  if (need_input) {
    at::globalContext().alertNotDeterministic("mmdet_dcnv2::deform_roi_pool_backward (CUDA, grad of input)");
  }
  if (need_offset && channel_blocks > 1) {
    at::globalContext().alertNotDeterministic("mmdet_dcnv2::deform_roi_pool_backward (CUDA, grad of offset)");
  }
  if ((need_input || need_offset) && items > 0) {
    const int64_t offset_numel = offset.defined() ? offset.numel() : 0;
    const bool wide =
        needs_wide_index({input.numel(), grad_output.numel(), rois.numel(), offset_numel, items});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_roi_pool_backward_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto launch = [&](auto index_zero) {
        using index_t = decltype(index_zero);
        backward_kernel<scalar_t, acc_t, index_t>
            <<<blocks_for(items), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                items, g, channel_blocks, input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
                data_or_null<scalar_t>(offset), grad_output.const_data_ptr<scalar_t>(),
                mutable_data_or_null<acc_t>(grad_input), mutable_data_or_null<acc_t>(grad_offset));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      wide ? launch(int64_t(0)) : launch(int32_t(0));
    });
  }
  auto finish = [&](const at::Tensor& acc) {
    return acc.defined() ? acc.to(input.scalar_type()) : at::empty({0}, input.options());
  };
  return {finish(grad_input), finish(grad_offset)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CUDA, m) {
  m.impl("deform_roi_pool", &forward_cuda);
  m.impl("deform_roi_pool_backward", &backward_cuda);
}

}  // namespace mmdet_dcnv2
