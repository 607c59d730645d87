// Modulated deformable convolution on CUDA: the element functions of dcn_common.h in grid-stride
// kernels, under the chunked GEMM driver of deform_conv.cpp (cuBLAS does the GEMMs).
//
// One thread handles one (deform group, block of channels, kernel point, image, output pixel): the
// sampling point's corners and weights are computed once and reused for every channel of the block,
// and consecutive threads take consecutive pixels so column reads/writes coalesce. The block size is
// chosen so that the grid fills the GPU even when a group has hundreds of channels.
//
// The backward scatters into grad_input with atomics (and into grad_offset/grad_mask when a group's
// channels are split over several blocks), accumulating half types in float: the order of the adds,
// and so the rounding, varies run to run. Under torch.use_deterministic_algorithms(True) it takes a
// deterministic path instead (docs/cuda.md): grad_input is gathered -- every (sample, corner) pair
// becomes an entry keyed by the input pixel it feeds, the entries are stably sorted by key, and one
// thread per input element sums its entries in that order -- and the offset/mask gradients use one
// block per group, so each is written by one thread. The forward never uses atomics.
//
// These kernels also compile for the host (host_emulation.h), for the test-only host-run build.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifdef MMDET_DCNV2_HOST_EMULATION
#include "host_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/cuda/Atomic.cuh>
#endif

#include <limits>

#include "../data_or_null.h"
#include "../deform_conv.h"
#include "grid_stride.cuh"

namespace mmdet_dcnv2 {
namespace {

template <typename index_t>
struct Item {
  index_t grp, cblock, k, b, p;
};

// item = (((grp * blocks_per_group + cblock) * taps + k) * count + b) * width + (p - p0): pixels
// fastest, so consecutive threads touch consecutive columns.
template <typename index_t>
__device__ __forceinline__ Item<index_t> decompose(index_t item, const ConvGeometry& g, const ColumnTile& tile,
                                                   index_t blocks_per_group) {
  Item<index_t> it;
  const index_t width = static_cast<index_t>(tile.width()), taps = static_cast<index_t>(g.taps());
  it.p = item % width + static_cast<index_t>(tile.p0);
  item /= width;
  it.b = item % static_cast<index_t>(tile.count);
  item /= static_cast<index_t>(tile.count);
  it.k = item % taps;
  item /= taps;
  it.cblock = item % blocks_per_group;
  it.grp = item / blocks_per_group;
  return it;
}

// The corners of an item's sampling point (mask not applied) and its mask value.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ Corners<acc_t, index_t> item_corners(const Item<index_t>& it, const ConvGeometry& g,
                                                                index_t n, const scalar_t* offset, const scalar_t* mask,
                                                                acc_t& m) {
  const index_t pixels = static_cast<index_t>(g.pixels());
  const index_t row = g.sampling_row(it.grp, it.k);
  const index_t oy = it.p / static_cast<index_t>(g.out_w), ox = it.p % static_cast<index_t>(g.out_w);
  const index_t ki = it.k / static_cast<index_t>(g.kernel_w), kj = it.k % static_cast<index_t>(g.kernel_w);
  const scalar_t* off = offset + g.offset_index(n, row, it.p);
  const acc_t y = conv_base_y<acc_t>(g.sampling, oy, ki) + static_cast<acc_t>(off[0]);
  const acc_t x = conv_base_x<acc_t>(g.sampling, ox, kj) + static_cast<acc_t>(off[pixels]);
  m = mask ? static_cast<acc_t>(mask[g.mask_index(n, row, it.p)]) : acc_t(1);
  return zero_border_corners<acc_t, index_t>(y, x, static_cast<index_t>(g.height), static_cast<index_t>(g.width));
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void fill_columns_kernel(index_t items, ConvGeometry g, ColumnTile tile, index_t cpb,
                                    index_t blocks_per_group, const scalar_t* __restrict__ input,
                                    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                    scalar_t* __restrict__ columns) {
  const index_t pixels = static_cast<index_t>(g.pixels()), taps = static_cast<index_t>(g.taps());
  const index_t plane = static_cast<index_t>(g.plane()), cols = static_cast<index_t>(tile.cols());
  const index_t width = static_cast<index_t>(tile.width()), p0 = static_cast<index_t>(tile.p0);
  const index_t cpg = static_cast<index_t>(g.in_per_deform_group());
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, tile, blocks_per_group);
    const index_t n = static_cast<index_t>(tile.n0) + it.b;
    acc_t m;
    const Corners<acc_t, index_t> corners = item_corners<scalar_t, acc_t, index_t>(it, g, n, offset, mask, m);
    const index_t c_begin = it.grp * cpg + it.cblock * cpb;
    const index_t c_end = min(c_begin + cpb, (it.grp + 1) * cpg);
    const scalar_t* x = input + (n * static_cast<index_t>(g.in_channels) + c_begin) * plane;
    scalar_t* col = columns + (c_begin * taps + it.k) * cols + it.b * width + (it.p - p0);
    for (index_t c = c_begin; c < c_end; ++c, x += plane, col += taps * cols) {
      // The mask multiplies the sample, as in mmcv: a sample outside the map is 0 * m, NaN for a
      // non-finite mask (the CPU kernel, mmcv and torchvision agree).
      *col = static_cast<scalar_t>(corners_gather<acc_t>(x, corners) * m);
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void backprop_columns_kernel(index_t items, ConvGeometry g, ColumnTile tile, index_t cpb,
                                        index_t blocks_per_group, const scalar_t* __restrict__ input,
                                        const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                        const scalar_t* __restrict__ grad_columns, acc_t* __restrict__ grad_input,
                                        acc_t* __restrict__ grad_offset, acc_t* __restrict__ grad_mask) {
  const index_t pixels = static_cast<index_t>(g.pixels()), taps = static_cast<index_t>(g.taps());
  const index_t plane = static_cast<index_t>(g.plane()), cols = static_cast<index_t>(tile.cols());
  const index_t width = static_cast<index_t>(tile.width()), p0 = static_cast<index_t>(tile.p0);
  const index_t cpg = static_cast<index_t>(g.in_per_deform_group());
  auto atomic_add = [](acc_t* ptr, acc_t v) { gpuAtomicAdd(ptr, v); };
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, tile, blocks_per_group);
    const index_t n = static_cast<index_t>(tile.n0) + it.b;
    acc_t m;
    const Corners<acc_t, index_t> corners = item_corners<scalar_t, acc_t, index_t>(it, g, n, offset, mask, m);
    // A sample outside the map reads nothing and scatters nothing, but its offset gradient is still
    // 0 * m below (NaN for a non-finite mask, as on the CPU and in mmcv).
    const bool outside = corners.idx[0] < 0 && corners.idx[1] < 0 && corners.idx[2] < 0 && corners.idx[3] < 0;
    if (outside && !grad_offset) continue;
    const index_t c_begin = it.grp * cpg + it.cblock * cpb;
    const index_t c_end = outside ? c_begin : min(c_begin + cpb, (it.grp + 1) * cpg);
    const index_t plane0 = (n * static_cast<index_t>(g.in_channels) + c_begin) * plane;
    const scalar_t* gcol = grad_columns + (c_begin * taps + it.k) * cols + it.b * width + (it.p - p0);
    acc_t dy_sum = acc_t(0), dx_sum = acc_t(0), v_sum = acc_t(0);
    for (index_t c = c_begin, off = plane0; c < c_end; ++c, off += plane, gcol += taps * cols) {
      const acc_t gc = static_cast<acc_t>(*gcol);
      if (grad_input) corners_scatter(grad_input + off, corners, gc * m, atomic_add);
      if (grad_offset) {
        acc_t v, dy, dx;
        corners_gather_with_grad<acc_t>(input + off, corners, v, dy, dx);
        dy_sum += gc * dy;
        dx_sum += gc * dx;
        v_sum += gc * v;
      }
    }
    if (!grad_offset) continue;
    const index_t row = g.sampling_row(it.grp, it.k);
    acc_t* go = grad_offset + g.offset_index(n, row, it.p);
    acc_t* gm = grad_mask ? grad_mask + g.mask_index(n, row, it.p) : nullptr;
    if (blocks_per_group == 1) {  // this thread saw every channel of the group: no other writer
      go[0] = dy_sum * m;
      go[pixels] = dx_sum * m;
      if (gm) *gm = v_sum;
    } else {
      gpuAtomicAdd(go, dy_sum * m);
      gpuAtomicAdd(go + pixels, dx_sum * m);
      if (gm) gpuAtomicAdd(gm, v_sum);
    }
  }
}

// ---- deterministic grad_input (gather form) ----

// The key of an entry that feeds no input element (a corner outside the map): sorts last.
constexpr int64_t kNoTarget = std::numeric_limits<int64_t>::max();

// Entry 4 * s + j is corner j of sample s = ((grp * taps + k) * count + b) * width + (p - p0) (the
// items of backprop_columns_kernel with one block per group): its key is the input element it feeds,
// (b * deform_groups + grp) * plane + corner, its weight the corner's bilinear weight; mask[s] = m.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void corner_entries_kernel(index_t samples, ConvGeometry g, ColumnTile tile,
                                      const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                      int64_t* __restrict__ keys, acc_t* __restrict__ weights,
                                      acc_t* __restrict__ masks) {
  const int64_t plane = g.plane();
  for (index_t s = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; s < samples;
       s += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(s, g, tile, index_t(1));
    const index_t n = static_cast<index_t>(tile.n0) + it.b;
    acc_t m;
    const Corners<acc_t, index_t> corners = item_corners<scalar_t, acc_t, index_t>(it, g, n, offset, mask, m);
    const int64_t target0 = (int64_t(it.b) * g.deform_groups + it.grp) * plane;
    for (int j = 0; j < 4; ++j) {
      const int64_t e = int64_t(s) * 4 + j;
      keys[e] = corners.idx[j] >= 0 ? target0 + corners.idx[j] : kNoTarget;
      weights[e] = corners.w[j];
    }
    masks[s] = m;
  }
}

// One thread per input element (b, c, pixel) of the tile's images: the sum, in sorted-entry order,
// of what its entries feed it from channel c's column gradients, added to grad_input. No other
// thread writes that element during the launch, so no atomics are needed.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void gather_grad_input_kernel(index_t items, ConvGeometry g, ColumnTile tile, int64_t entries,
                                         const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                         const acc_t* __restrict__ weights, const acc_t* __restrict__ masks,
                                         const scalar_t* __restrict__ grad_columns, acc_t* __restrict__ grad_input) {
  const index_t plane = static_cast<index_t>(g.plane()), channels = static_cast<index_t>(g.in_channels);
  const index_t cpg = static_cast<index_t>(g.in_per_deform_group()), taps = static_cast<index_t>(g.taps());
  const int64_t per_channel = int64_t(taps) * tile.cols();  // samples of one deform group
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t pixel = item % plane, c = (item / plane) % channels, b = item / (plane * channels);
    const int64_t key = (int64_t(b) * g.deform_groups + c / cpg) * plane + pixel;
    const int64_t lo = first_entry(sorted_keys, entries, key);
    if (lo == entries || sorted_keys[lo] != key) continue;
    const scalar_t* gcol = grad_columns + int64_t(c) * per_channel;
    acc_t sum = acc_t(0);
    for (int64_t e = lo; e < entries && sorted_keys[e] == key; ++e) {
      const int64_t entry = order[e], sample = entry / 4;
      // The same product as the atomic path's corners_scatter: (column gradient * mask) * weight.
      sum += static_cast<acc_t>(gcol[sample % per_channel]) * masks[sample] * weights[entry];
    }
    grad_input[((tile.n0 + b) * channels + c) * int64_t(plane) + pixel] += sum;
  }
}

template <typename scalar_t>
class CudaColumns final : public ColumnKernels {
  using acc_t = at::opmath_type<scalar_t>;

 public:
  CudaColumns(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask)
      : g_(g), input_(input), offset_(offset), mask_(mask) {
    // Enough items to give every SM a few waves, without splitting a group finer than needed.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    target_items_ = sms * 2048 * 2;
    wide_index_ = needs_wide_index({input.numel(), offset.numel(), g.in_channels * g.taps() * g.batch * g.pixels()});
  }

  // The GPU wants large GEMMs: only the user's budget limits a tile.
  int64_t preferred_tile_bytes() const override { return std::numeric_limits<int64_t>::max(); }

  void begin_tile(const ColumnTile& tile) override {
    tile_ = tile;
    const int64_t cpg = g_.in_per_deform_group();
    base_items_ = g_.deform_groups * g_.taps() * tile.cols();
    const int64_t wanted = std::min(cpg, std::max<int64_t>(1, (target_items_ + base_items_ - 1) / base_items_));
    split_ = split_into(wanted);
  }

  void fill_columns(const at::Tensor& columns) override {
    with_index_type(wide_index_, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      DCN_LAUNCH(blocks_for(split_.items), kThreads, at::cuda::getCurrentCUDAStream(),
                 fill_columns_kernel<scalar_t, acc_t, index_t>)(
          split_.items, g_, tile_, split_.channels_per_block, split_.blocks_per_group,
          input_.const_data_ptr<scalar_t>(), offset_.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(mask_),
          columns.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) override {
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    if (deterministic && grads.input.defined()) gather_grad_input(grad_columns, grads.input);
    if (deterministic && !grads.offset.defined()) return;
    // Deterministic: the offset and mask gradients from one block per group, each written by the one
    // thread that sees all of the group's channels (only this kernel needs that: the forward and the
    // weight gradient's columns have no atomics to avoid).
    const Split split = deterministic ? split_into(1) : split_;
    acc_t* grad_input = deterministic ? nullptr : mutable_data_or_null<acc_t>(grads.input);
    with_index_type(wide_index_, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      DCN_LAUNCH(blocks_for(split.items), kThreads, at::cuda::getCurrentCUDAStream(),
                 backprop_columns_kernel<scalar_t, acc_t, index_t>)(
          split.items, g_, tile_, split.channels_per_block, split.blocks_per_group, input_.const_data_ptr<scalar_t>(),
          offset_.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(mask_), grad_columns.const_data_ptr<scalar_t>(),
          grad_input, mutable_data_or_null<acc_t>(grads.offset), mutable_data_or_null<acc_t>(grads.mask));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

 private:
  // How a group's channels are split over blocks: `items` threads' worth of work in all.
  struct Split {
    int64_t channels_per_block, blocks_per_group, items;
  };

  Split split_into(int64_t wanted_blocks) const {
    const int64_t cpg = g_.in_per_deform_group();
    const int64_t per_block = (cpg + wanted_blocks - 1) / wanted_blocks;
    const int64_t blocks = (cpg + per_block - 1) / per_block;
    return {per_block, blocks, base_items_ * blocks};
  }

  // grad_input += the tile's column gradients, gathered (see the kernels above): entries, a stable
  // sort by the element they feed, then one thread per input element. Deterministic whatever the
  // order in which blocks run.
  void gather_grad_input(const at::Tensor& grad_columns, at::Tensor& grad_input) {
    const int64_t samples = base_items_, entries = 4 * samples;
    const auto options = input_.options();
    at::Tensor keys = at::empty({entries}, options.dtype(at::kLong));
    at::Tensor weights = at::empty({entries}, options.dtype(grad_input.scalar_type()));
    at::Tensor masks = at::empty({samples}, options.dtype(grad_input.scalar_type()));
    with_index_type(wide_index_, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      DCN_LAUNCH(blocks_for(samples), kThreads, at::cuda::getCurrentCUDAStream(),
                 corner_entries_kernel<scalar_t, acc_t, index_t>)(
          samples, g_, tile_, offset_.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(mask_),
          keys.data_ptr<int64_t>(), weights.data_ptr<acc_t>(), masks.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // Stable: entries of one element stay in entry order, so the sum below has a fixed order.
    const auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const int64_t items = tile_.count * g_.in_channels * g_.plane();
    with_index_type(wide_index_, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      DCN_LAUNCH(blocks_for(items), kThreads, at::cuda::getCurrentCUDAStream(),
                 gather_grad_input_kernel<scalar_t, acc_t, index_t>)(
          items, g_, tile_, entries, sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
          weights.const_data_ptr<acc_t>(), masks.const_data_ptr<acc_t>(), grad_columns.const_data_ptr<scalar_t>(),
          grad_input.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const ConvGeometry& g_;
  const at::Tensor &input_, &offset_, &mask_;
  ColumnTile tile_{};
  int64_t target_items_ = 0, base_items_ = 0;
  Split split_{1, 1, 0};
  bool wide_index_ = false;
};

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  // The checks first: a tensor on the wrong device gets the message naming it, not the guard's.
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(), "modulated_deform_conv2d_cuda",
                                  [&] {
                                    CudaColumns<scalar_t> kernels(op.g, op.input, op.offset, op.mask);
                                    output = deform_conv_forward(op, kernels);
                                  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups,
    std::array<bool, 3> output_mask) {
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad_output(grad_output, op.input, op.g);
  const c10::cuda::CUDAGuard guard(input.device());
  // No alertNotDeterministic: under deterministic algorithms CudaColumns takes its deterministic path.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(),
                                  "modulated_deform_conv2d_backward_cuda", [&] {
                                    CudaColumns<scalar_t> kernels(op.g, op.input, op.offset, op.mask);
                                    grads = deform_conv_backward(op, grad_output.contiguous(), output_mask, kernels);
                                  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, DCN_CUDA_DISPATCH_KEY, m) {
  m.impl("modulated_deform_conv2d", &forward_cuda);
  m.impl("modulated_deform_conv2d_backward", &backward_cuda);
}

}  // namespace mmdet_dcnv2
