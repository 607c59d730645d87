// Modulated deformable convolution on CUDA: the element functions of dcn_common.h in grid-stride
// kernels, under the chunked GEMM driver of deform_conv.cpp (cuBLAS does the GEMMs).
//
// One thread handles one (deform group, block of channels, kernel point, image, output pixel): the
// sampling point's corners and weights are computed once and reused for every channel of the block,
// and consecutive threads take consecutive pixels so column reads/writes coalesce. The block size is
// chosen so that the grid fills the GPU even when a group has hundreds of channels.
//
// The backward scatters into grad_input with atomics (and into grad_offset/grad_mask when a group's
// channels are split over several blocks), accumulating half types in float. Atomics make it
// nondeterministic: torch.use_deterministic_algorithms(True) raises, as for other such CUDA ops.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

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
                                                                 index_t n, const scalar_t* offset,
                                                                 const scalar_t* mask, acc_t& m) {
  const index_t pixels = static_cast<index_t>(g.pixels()), taps = static_cast<index_t>(g.taps());
  const index_t rows = static_cast<index_t>(g.deform_groups) * taps, row = it.grp * taps + it.k;
  const index_t oy = it.p / static_cast<index_t>(g.out_w), ox = it.p % static_cast<index_t>(g.out_w);
  const index_t ki = it.k / static_cast<index_t>(g.kernel_w), kj = it.k % static_cast<index_t>(g.kernel_w);
  const scalar_t* off = offset + (n * 2 * rows + 2 * row) * pixels + it.p;
  const acc_t y = conv_base_y<acc_t>(g.sampling, oy, ki) + static_cast<acc_t>(off[0]);
  const acc_t x = conv_base_x<acc_t>(g.sampling, ox, kj) + static_cast<acc_t>(off[pixels]);
  m = mask ? static_cast<acc_t>(mask[(n * rows + row) * pixels + it.p]) : acc_t(1);
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
    Corners<acc_t, index_t> corners = item_corners<scalar_t, acc_t, index_t>(it, g, n, offset, mask, m);
    scale_corners(corners, m);
    const index_t c_begin = it.grp * cpg + it.cblock * cpb;
    const index_t c_end = min(c_begin + cpb, (it.grp + 1) * cpg);
    const scalar_t* x = input + (n * static_cast<index_t>(g.in_channels) + c_begin) * plane;
    scalar_t* col = columns + (c_begin * taps + it.k) * cols + it.b * width + (it.p - p0);
    for (index_t c = c_begin; c < c_end; ++c, x += plane, col += taps * cols) {
      *col = static_cast<scalar_t>(corners_gather<acc_t>(x, corners));
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
  const index_t rows = static_cast<index_t>(g.deform_groups) * taps;
  auto atomic_add = [](acc_t* ptr, acc_t v) { gpuAtomicAdd(ptr, v); };
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const Item<index_t> it = decompose<index_t>(item, g, tile, blocks_per_group);
    const index_t n = static_cast<index_t>(tile.n0) + it.b;
    acc_t m;
    const Corners<acc_t, index_t> corners = item_corners<scalar_t, acc_t, index_t>(it, g, n, offset, mask, m);
    if (corners.idx[0] < 0 && corners.idx[1] < 0 && corners.idx[2] < 0 && corners.idx[3] < 0) continue;
    const index_t c_begin = it.grp * cpg + it.cblock * cpb;
    const index_t c_end = min(c_begin + cpb, (it.grp + 1) * cpg);
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
    const index_t row = it.grp * taps + it.k;
    acc_t* go = grad_offset + (n * 2 * rows + 2 * row) * pixels + it.p;
    acc_t* gm = grad_mask ? grad_mask + (n * rows + row) * pixels + it.p : nullptr;
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
    const int64_t base = g_.deform_groups * g_.taps() * tile.cols();
    // Under torch.use_deterministic_algorithms, one block per group: the offset and mask gradients
    // are then written by exactly one thread each, without atomics.
    const int64_t wanted = at::globalContext().deterministicAlgorithms()
                               ? 1
                               : std::min(cpg, std::max<int64_t>(1, (target_items_ + base - 1) / base));
    channels_per_block_ = (cpg + wanted - 1) / wanted;
    blocks_per_group_ = (cpg + channels_per_block_ - 1) / channels_per_block_;
    items_ = base * blocks_per_group_;
  }

  void fill_columns(const at::Tensor& columns) override {
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      fill_columns_kernel<scalar_t, acc_t, index_t>
          <<<blocks_for(items_), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              items_, g_, tile_, channels_per_block_, blocks_per_group_, input_.const_data_ptr<scalar_t>(),
              offset_.const_data_ptr<scalar_t>(), mask_ptr(), columns.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    wide_index_ ? launch(int64_t(0)) : launch(int32_t(0));
  }

  void backprop_columns(const at::Tensor& grad_columns, ConvGrads& grads) override {
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      backprop_columns_kernel<scalar_t, acc_t, index_t>
          <<<blocks_for(items_), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              items_, g_, tile_, channels_per_block_, blocks_per_group_, input_.const_data_ptr<scalar_t>(),
              offset_.const_data_ptr<scalar_t>(), mask_ptr(), grad_columns.const_data_ptr<scalar_t>(),
              data_or_null(grads.input), data_or_null(grads.offset), data_or_null(grads.mask));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    wide_index_ ? launch(int64_t(0)) : launch(int32_t(0));
  }

 private:
  const scalar_t* mask_ptr() const { return mask_.defined() ? mask_.const_data_ptr<scalar_t>() : nullptr; }
  static acc_t* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; }

  const ConvGeometry& g_;
  const at::Tensor &input_, &offset_, &mask_;
  ColumnTile tile_{};
  int64_t target_items_ = 0, channels_per_block_ = 1, blocks_per_group_ = 1, items_ = 0;
  bool wide_index_ = false;
};

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
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
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvOperands op =
      deform_conv_operands(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad_output(grad_output, op.input, op.g);
  if (output_mask[0]) {  // the input gradient is a scatter with atomics
    at::globalContext().alertNotDeterministic("mmdet_dcnv2::modulated_deform_conv2d_backward (CUDA, grad of input)");
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.input.scalar_type(),
                                  "modulated_deform_conv2d_backward_cuda", [&] {
    CudaColumns<scalar_t> kernels(op.g, op.input, op.offset, op.mask);
    grads = deform_conv_backward(op, grad_output.contiguous(), output_mask, kernels);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_dcnv2, CUDA, m) {
  m.impl("modulated_deform_conv2d", &forward_cuda);
  m.impl("modulated_deform_conv2d_backward", &backward_cuda);
}

}  // namespace mmdet_dcnv2
