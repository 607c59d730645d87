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
// split over several threads: the order of the adds varies run to run. Under
// torch.use_deterministic_algorithms(True) it takes a deterministic path instead (docs/cuda.md):
// grad_input is gathered (entries per sample corner, stably sorted by the input pixel they feed, one
// thread per input element summing its entries in that order), and each block of channels writes its
// part of grad_offset to a slice of its own, the slices then summed by a (deterministic) reduction.
//
// These kernels also compile for the host (host_emulation.h), for the test-only host-run build.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifdef MMDET_DCNV2_HOST_EMULATION
#include "host_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/cuda/Atomic.cuh>
#endif

#include <algorithm>
#include <array>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "../data_or_null.h"
#include "../deform_roi_pool.h"
#include "grid_stride.cuh"

namespace mmdet_dcnv2 {
namespace {

constexpr int kChannels = 4;  // channels per thread sharing one computation of each sample's corners

template <typename index_t>
struct Item {
  index_t r, cblock, c_begin, bin;
  int width;  // channels of this item's block: kChannels, or fewer in the last block
};

// item = (r * channel_blocks + cblock) * bins + bin: bins fastest.
template <typename index_t>
__device__ __forceinline__ Item<index_t> decompose(index_t item, const RoIPoolGeometry& g, index_t channel_blocks) {
  const index_t bins = static_cast<index_t>(g.bins());
  Item<index_t> it;
  it.bin = item % bins;
  item /= bins;
  it.cblock = item % channel_blocks;
  it.c_begin = it.cblock * kChannels;
  it.r = item / channel_blocks;
  it.width = static_cast<int>(min(static_cast<index_t>(kChannels), static_cast<index_t>(g.channels) - it.c_begin));
  return it;
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(index_t items, RoIPoolGeometry g, index_t channel_blocks,
                               const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
                               const scalar_t* __restrict__ offset, scalar_t* __restrict__ output) {
  const index_t plane = static_cast<index_t>(g.plane()), bins = static_cast<index_t>(g.bins());
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, channel_blocks);
    acc_t sums[kChannels] = {};
    acc_t count = acc_t(1);
    const int64_t n = roi_batch_index(static_cast<acc_t>(rois[it.r * 5]), g.batch);
    if (n >= 0) {
      const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, it.r, it.bin);
      count = roi_bin_count(b);
      const scalar_t* x = input + g.input_plane(static_cast<index_t>(n), it.c_begin);
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
    scalar_t* out = output + g.output_index(it.r, it.c_begin, it.bin);
#pragma unroll
    for (int j = 0; j < kChannels; ++j) {
      if (j < it.width) out[j * bins] = static_cast<scalar_t>(sums[j] / count);
    }
  }
}

// grad_input (when non-null) += the bin's gradient scattered through each sample's weights;
// grad_offset (when non-null) = the channels' sum of grad * d(sample)/d(offset), laid out as
// (R, offset_slices, 2, out_h, out_w): with one slice per channel block each item writes its own
// element, with one slice the blocks of a RoI add into it atomically (unless there is one block).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backward_kernel(index_t items, RoIPoolGeometry g, index_t channel_blocks, index_t offset_slices,
                                const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
                                const scalar_t* __restrict__ offset, const scalar_t* __restrict__ grad_output,
                                acc_t* __restrict__ grad_input, acc_t* __restrict__ grad_offset) {
  const index_t plane = static_cast<index_t>(g.plane()), bins = static_cast<index_t>(g.bins());
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  auto atomic_add = [](acc_t* ptr, acc_t v) { gpuAtomicAdd(ptr, v); };
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, channel_blocks);
    const int64_t n = roi_batch_index(static_cast<acc_t>(rois[it.r * 5]), g.batch);
    if (n < 0) continue;  // grad_offset is zero-initialised: nothing to write
    const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, it.r, it.bin);
    const acc_t count = roi_bin_count(b);
    const index_t plane0 = g.input_plane(static_cast<index_t>(n), it.c_begin);
    const scalar_t* gout = grad_output + g.output_index(it.r, it.c_begin, it.bin);
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
    const bool own_slice = offset_slices == channel_blocks;  // no other writer
    // grad_offset is (R * offset_slices, 2, out_h, out_w): this item's RoI slice is r * offset_slices + slice.
    acc_t* go = grad_offset + g.offset_index(it.r * offset_slices + (own_slice ? it.cblock : index_t(0)), it.bin);
    if (own_slice) {
      go[0] = gamma * b.roi_w * d_x;
      go[bins] = gamma * b.roi_h * d_y;
    } else {
      gpuAtomicAdd(go, gamma * b.roi_w * d_x);
      gpuAtomicAdd(go + bins, gamma * b.roi_h * d_y);
    }
  }
}

// ---- deterministic grad_input (gather form) ----

// The key the entries start with (every one is then overwritten: a sample that reads the map has
// four in-map corners); it would sort last.
constexpr int64_t kNoTarget = std::numeric_limits<int64_t>::max();

// The samples of bin `item` (= r * bins + bin) that read the map, or 0 for a RoI with an invalid batch
// index: what the entries of its bin take.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void count_samples_kernel(index_t items, RoIPoolGeometry g, const scalar_t* __restrict__ rois,
                                     const scalar_t* __restrict__ offset, int64_t* __restrict__ counts) {
  const index_t bins = static_cast<index_t>(g.bins());
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t r = item / bins, bin = item % bins;
    int64_t count = 0;
    if (roi_batch_index(static_cast<acc_t>(rois[r * 5]), g.batch) >= 0) {
      const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, r, bin);
      for (int64_t iy = 0; iy < b.grid_h; ++iy) {
        for (int64_t ix = 0; ix < b.grid_w; ++ix) {
          count += !no_sample(roi_sample_corners<acc_t, index_t>(b, iy, ix, height, width));
        }
      }
    }
    counts[item] = count;
  }
}

// Bin `item`'s samples that read the map, in grid order, become entries 4 * (starts[item] + s) + j
// (corner j of its s-th such sample): key = image * plane + corner, weight = the corner's weight;
// counts[item] = the bin's sample count (the atomic path scatters (grad / count) * weight).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void sample_entries_kernel(index_t items, RoIPoolGeometry g, const scalar_t* __restrict__ rois,
                                      const scalar_t* __restrict__ offset, const int64_t* __restrict__ starts,
                                      int64_t* __restrict__ keys, acc_t* __restrict__ weights,
                                      acc_t* __restrict__ counts, int64_t* __restrict__ sample_bins) {
  const index_t bins = static_cast<index_t>(g.bins());
  const index_t height = static_cast<index_t>(g.height), width = static_cast<index_t>(g.width);
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t r = item / bins, bin = item % bins;
    const int64_t n = roi_batch_index(static_cast<acc_t>(rois[r * 5]), g.batch);
    if (n < 0) continue;
    const RoIBin<acc_t> b = roi_pool_bin<acc_t>(g, rois, offset, r, bin);
    counts[item] = roi_bin_count(b);
    int64_t s = starts[item];
    for (int64_t iy = 0; iy < b.grid_h; ++iy) {
      for (int64_t ix = 0; ix < b.grid_w; ++ix) {
        const Corners<acc_t, index_t> corners = roi_sample_corners<acc_t, index_t>(b, iy, ix, height, width);
        if (no_sample(corners)) continue;
        for (int j = 0; j < 4; ++j) {
          keys[4 * s + j] = n * g.plane() + corners.idx[j];
          weights[4 * s + j] = corners.w[j];
        }
        sample_bins[s++] = item;
      }
    }
  }
}

// One thread per input element (image, channel, pixel): the sum of its entries in sorted order.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void gather_grad_input_kernel(index_t items, RoIPoolGeometry g, int64_t entries,
                                         const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                         const acc_t* __restrict__ weights, const acc_t* __restrict__ counts,
                                         const int64_t* __restrict__ sample_bins,
                                         const scalar_t* __restrict__ grad_output, acc_t* __restrict__ grad_input) {
  const index_t plane = static_cast<index_t>(g.plane()), channels = static_cast<index_t>(g.channels);
  const int64_t bins = g.bins();
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t pixel = item % plane, c = (item / plane) % channels, n = item / (plane * channels);
    const int64_t key = int64_t(n) * plane + pixel;
    const int64_t lo = first_entry(sorted_keys, entries, key);
    acc_t sum = acc_t(0);
    for (int64_t e = lo; e < entries && sorted_keys[e] == key; ++e) {
      const int64_t entry = order[e], bin_item = sample_bins[entry / 4];
      const int64_t r = bin_item / bins, bin = bin_item % bins;
      // The atomic path's product: (grad / count) * weight.
      sum += static_cast<acc_t>(grad_output[g.output_index<int64_t>(r, c, bin)]) / counts[bin_item] * weights[entry];
    }
    grad_input[item] = sum;
  }
}

int64_t channel_blocks_of(const RoIPoolGeometry& g) { return (g.channels + kChannels - 1) / kChannels; }

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                        at::IntArrayRef output_size, double spatial_scale, int64_t sampling_ratio, double gamma) {
  // The checks first: a tensor on the wrong device gets the message naming it, not the guard's.
  const RoIPoolOperands op =
      deform_roi_pool_operands(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma);
  const RoIPoolGeometry& g = op.g;
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty(g.output_shape(), op.input.options());
  if (output.numel() == 0) return output;
  const int64_t channel_blocks = channel_blocks_of(g), items = g.num_rois * channel_blocks * g.bins();
  const int64_t offset_numel = op.offset.defined() ? op.offset.numel() : 0;
  const bool wide = needs_wide_index({op.input.numel(), output.numel(), op.rois.numel(), offset_numel, items});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(), "deform_roi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(wide, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      DCN_LAUNCH(blocks_for(items), kThreads, at::cuda::getCurrentCUDAStream(),
                 forward_kernel<scalar_t, acc_t, index_t>)(
          items, g, channel_blocks, op.input.const_data_ptr<scalar_t>(), op.rois.const_data_ptr<scalar_t>(),
          data_or_null<scalar_t>(op.offset), output.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

// grad_input, deterministically: see gather_grad_input_kernel. Costs one device-to-host copy (the
// number of entries) and a sort.
template <typename scalar_t, typename acc_t>
void gather_grad_input(const RoIPoolGeometry& g, const at::Tensor& rois, const at::Tensor& offset,
                       const at::Tensor& grad_output, at::Tensor& grad_input, bool wide) {
  const int64_t bin_items = g.num_rois * g.bins();
  const auto options = grad_input.options();
  const scalar_t* rois_ptr = rois.const_data_ptr<scalar_t>();
  const scalar_t* offset_ptr = data_or_null<scalar_t>(offset);
  with_index_type(wide, [&](auto index_zero) {
    using index_t = decltype(index_zero);
    at::Tensor counts = at::empty({bin_items}, options.dtype(at::kLong));
    DCN_LAUNCH(blocks_for(bin_items), kThreads, at::cuda::getCurrentCUDAStream(),
               count_samples_kernel<scalar_t, acc_t, index_t>)(bin_items, g, rois_ptr, offset_ptr,
                                                               counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor ends = counts.cumsum(0);
    const int64_t samples = ends[-1].item<int64_t>();
    const at::Tensor starts = ends - counts;
    const int64_t entries = 4 * samples;
    at::Tensor keys = at::full({entries}, kNoTarget, options.dtype(at::kLong));
    at::Tensor weights = at::empty({entries}, options);
    at::Tensor bin_counts = at::ones({bin_items}, options);
    at::Tensor sample_bins = at::empty({samples}, options.dtype(at::kLong));
    DCN_LAUNCH(blocks_for(bin_items), kThreads, at::cuda::getCurrentCUDAStream(),
               sample_entries_kernel<scalar_t, acc_t, index_t>)(
        bin_items, g, rois_ptr, offset_ptr, starts.const_data_ptr<int64_t>(), keys.data_ptr<int64_t>(),
        weights.data_ptr<acc_t>(), bin_counts.data_ptr<acc_t>(), sample_bins.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Stable: the entries of one element stay in (RoI, bin, sample, corner) order.
    const auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const int64_t items = grad_input.numel();
    DCN_LAUNCH(blocks_for(items), kThreads, at::cuda::getCurrentCUDAStream(),
               gather_grad_input_kernel<scalar_t, acc_t, index_t>)(
        items, g, entries, sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        weights.const_data_ptr<acc_t>(), bin_counts.const_data_ptr<acc_t>(), sample_bins.const_data_ptr<int64_t>(),
        grad_output.const_data_ptr<scalar_t>(), grad_input.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input,
                                                 const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                                                 at::IntArrayRef output_size, double spatial_scale,
                                                 int64_t sampling_ratio, double gamma,
                                                 std::array<bool, 2> output_mask) {
  const RoIPoolOperands op =
      deform_roi_pool_operands(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma);
  const RoIPoolGeometry& g = op.g;
  check_deform_roi_pool_grad_output(grad_output_, op.input, g);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool need_input = output_mask[0], need_offset = output_mask[1] && op.offset.defined();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t channel_blocks = channel_blocks_of(g), items = g.num_rois * channel_blocks * g.bins();
  // No alertNotDeterministic: under deterministic algorithms grad_input is gathered and every channel
  // block writes grad_offset to its own slice.
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t offset_slices = deterministic ? channel_blocks : 1;

  // Both gradients are sums: accumulate them in opmath (float for half types).
  const auto acc_options = op.input.options().dtype(at::toOpMathType(op.input.scalar_type()));
  at::Tensor grad_input = need_input ? at::zeros(op.input.sizes(), acc_options) : at::Tensor();
  at::Tensor grad_offset =
      need_offset ? at::zeros({g.num_rois, offset_slices, 2, g.pooled_h, g.pooled_w}, acc_options) : at::Tensor();
  const int64_t offset_numel = op.offset.defined() ? op.offset.numel() : 0;
  const bool wide = needs_wide_index({op.input.numel(), grad_output.numel(), op.rois.numel(), offset_numel, items,
                                      grad_offset.defined() ? grad_offset.numel() : 0});
  const bool scatter_input = need_input && !deterministic;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, op.input.scalar_type(), "deform_roi_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (need_input && deterministic && grad_input.numel() > 0 && g.num_rois > 0) {
          gather_grad_input<scalar_t, acc_t>(g, op.rois, op.offset, grad_output, grad_input, wide);
        }
        if (!(scatter_input || need_offset) || items == 0) return;
        with_index_type(wide, [&](auto index_zero) {
          using index_t = decltype(index_zero);
          DCN_LAUNCH(blocks_for(items), kThreads, at::cuda::getCurrentCUDAStream(),
                     backward_kernel<scalar_t, acc_t, index_t>)(
              items, g, channel_blocks, offset_slices, op.input.const_data_ptr<scalar_t>(),
              op.rois.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(op.offset),
              grad_output.const_data_ptr<scalar_t>(), scatter_input ? grad_input.data_ptr<acc_t>() : nullptr,
              mutable_data_or_null<acc_t>(grad_offset));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  auto finish = [&](const at::Tensor& acc) {
    return acc.defined() ? acc.to(op.input.scalar_type()) : at::empty({0}, op.input.options());
  };
  // The slices' sum: a reduction, which PyTorch runs deterministically.
  const at::Tensor offset_sum = grad_offset.defined() ? grad_offset.sum(1) : at::Tensor();
  return {finish(grad_input), finish(offset_sum)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, DCN_CUDA_DISPATCH_KEY, m) {
  m.impl("deform_roi_pool", &forward_cuda);
  m.impl("deform_roi_pool_backward", &backward_cuda);
}

}  // namespace mmdet_dcnv2
